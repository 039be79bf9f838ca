//! Amazon Redshift, by its own fast path: per tick and per target table, one manifest object
//! listing the batch's files is written to the bucket, then ONE transaction locks the ledger,
//! records the files, runs `COPY table FROM 's3://…/manifest' IAM_ROLE … MANIFEST`, marks the
//! files loaded with the row counts Redshift reports, and commits; only then are the files
//! moved. Redshift has no `SKIP LOCKED`: `LOCK` on the ledger makes replicas take turns, which
//! suits its batch loading. A COPY that fails names the bad file(s) in `stl_load_errors`:
//! those are recorded as failed, the others stay pending for the next tick.
//!
//! Redshift cannot run where this project is tested. The SQL and the manifest are checked by
//! unit tests; the transaction flow runs in the tests against PostgreSQL, with
//! `redshift.copy = "postgres-emulation"` standing in for the one statement PostgreSQL does not
//! have (COPY from S3 by manifest): it reads the manifest back from the store and copies each
//! listed file into the table, inside the same transaction. Nothing else differs. The
//! emulation is compiled only with the `redshift-emulation` feature, which the tests enable;
//! the released binary does not have it.

use std::collections::HashMap;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Postgres, Transaction};

use super::{
    LoadOutcome, SinkOptions, append_history, db_error, file_columns, outcome_of_state, quote_ident, retries_exhausted,
};
use crate::config::Config;
use crate::config::redshift::{CopyMode, RedshiftConfig};
use crate::error::{FileError, FileErrorKind, LoadError, Stage};
use crate::format::{self, Compression, Format, FormatOptions};
use crate::reader::FileReader;
use crate::routes::{LoadSpec, Routes};
use crate::schema::{ColumnType, TypeInference};
use crate::source::{INCOMING, ObjectMeta, Source};

/// A Redshift COPY manifest.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub entries: Vec<ManifestEntry>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ManifestEntry {
    pub url: String,
    pub mandatory: bool,
    pub meta: ManifestMeta,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ManifestMeta {
    pub content_length: u64,
}

impl Manifest {
    /// Every file, mandatory (a file missing at COPY time fails the COPY, so nothing is
    /// recorded as loaded that was not).
    pub fn of(files: &[(String, u64)]) -> Manifest {
        Manifest {
            entries: files
                .iter()
                .map(|(url, size)| ManifestEntry {
                    url: url.clone(),
                    mandatory: true,
                    meta: ManifestMeta { content_length: *size },
                })
                .collect(),
        }
    }
}

/// A Redshift string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

/// The COPY statement for one manifest.
pub fn copy_statement(
    table: &str,
    columns: &[String],
    manifest_url: &str,
    config: &RedshiftConfig,
    format: Format,
    options: &FormatOptions,
    compression: Compression,
) -> String {
    let mut sql = format!(
        "COPY {} ({}) FROM {} IAM_ROLE {} MANIFEST",
        quote_ident(table),
        columns.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", "),
        literal(manifest_url),
        literal(&config.iam_role)
    );
    match format {
        Format::Jsonl => sql.push_str(" FORMAT AS JSON 'auto'"),
        Format::Csv | Format::Tsv => {
            let delimiter = if format == Format::Tsv && options.format.is_none() {
                b'\t'
            } else {
                options.delimiter
            };
            sql.push_str(&format!(
                " FORMAT AS CSV DELIMITER {} QUOTE AS {}",
                literal(&(delimiter as char).to_string()),
                literal(&(options.quote as char).to_string())
            ));
            if options.header {
                sql.push_str(" IGNOREHEADER 1");
            }
            // An unquoted empty field is NULL, as everywhere in the loader.
            if options.null.is_empty() {
                sql.push_str(" EMPTYASNULL");
            } else {
                sql.push_str(&format!(" NULL AS {}", literal(&options.null)));
            }
        }
    }
    match compression {
        Compression::Gzip => sql.push_str(" GZIP"),
        Compression::Zstd => sql.push_str(" ZSTD"),
        Compression::None => {}
    }
    if let Some(region) = &config.region {
        sql.push_str(&format!(" REGION {}", literal(region)));
    }
    sql.push_str(" DATEFORMAT 'auto' TIMEFORMAT 'auto' COMPUPDATE OFF STATUPDATE OFF");
    sql
}

/// Redshift column types.
pub fn sql_type(t: ColumnType) -> &'static str {
    match t {
        ColumnType::Integer => "BIGINT",
        // Redshift DECIMAL needs a fixed scale; text keeps every digit as written.
        ColumnType::Numeric => "VARCHAR(65535)",
        ColumnType::Float => "DOUBLE PRECISION",
        ColumnType::Boolean => "BOOLEAN",
        ColumnType::Date => "DATE",
        ColumnType::Timestamp => "TIMESTAMP",
        ColumnType::TimestampTz => "TIMESTAMPTZ",
        ColumnType::Text => "VARCHAR(65535)",
        ColumnType::Json => "SUPER",
    }
}

pub struct RedshiftSink {
    pool: PgPool,
    options: SinkOptions,
    config: RedshiftConfig,
}

/// Files one Redshift COPY loads together: one table, format, format options and compression,
/// decided once when the batch is formed ([`RedshiftBatch::group`]).
#[derive(Debug, Clone)]
pub struct RedshiftBatch {
    pub files: Vec<ObjectMeta>,
    pub spec: LoadSpec,
    pub format: Format,
    pub compression: Compression,
}

impl RedshiftBatch {
    /// Groups `files`, in their order, into batches whose files one COPY can load.
    pub fn group(files: Vec<ObjectMeta>, routes: &Routes) -> Vec<RedshiftBatch> {
        let mut batches: Vec<RedshiftBatch> = Vec::new();
        for file in files {
            let spec = routes.resolve(&file.key);
            let format = spec.format.format.unwrap_or_else(|| Format::from_key(&file.key));
            let compression = Compression::from_key(&file.key).unwrap_or(Compression::None);
            let fits = |b: &RedshiftBatch| {
                b.spec.table == spec.table
                    && b.format == format
                    && b.compression == compression
                    && b.spec.format == spec.format
            };
            match batches.iter_mut().find(|b| fits(b)) {
                Some(batch) => batch.files.push(file),
                None => batches.push(RedshiftBatch {
                    files: vec![file],
                    spec,
                    format,
                    compression,
                }),
            }
        }
        batches
    }
}

/// What each file of a batch came to.
pub type BatchOutcome = Vec<(ObjectMeta, Result<LoadOutcome, LoadError>)>;

impl RedshiftSink {
    pub fn connect_lazy(url: &str, config: &Config, options: SinkOptions) -> anyhow::Result<RedshiftSink> {
        let pg_url = url.replacen("redshift://", "postgres://", 1);
        let connect = PgConnectOptions::from_str(&pg_url)
            .map_err(|e| {
                anyhow::anyhow!(
                    "database.url: {}",
                    crate::redact::scrub(&e.to_string(), &[url, &pg_url])
                )
            })?
            .application_name("s3-sql-loader");
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections())
            .acquire_timeout(config.database.connect_timeout)
            .after_connect(|conn, _| Box::pin(async move { super::postgres::disable_nagle(conn).await }))
            .connect_lazy_with(connect);
        Ok(RedshiftSink {
            pool,
            options,
            config: config.redshift.clone(),
        })
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ())
    }

    pub async fn close(&self) {
        self.pool.close().await
    }

    pub async fn ensure_ledger(&self) -> Result<(), sqlx::Error> {
        // No defaults that only one of Redshift and PostgreSQL knows: the loader sets times.
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {} (
                file_id VARCHAR(64) NOT NULL PRIMARY KEY, source VARCHAR(1024) NOT NULL,
                object_key VARCHAR(1024) NOT NULL, etag VARCHAR(256) NOT NULL, state VARCHAR(16) NOT NULL,
                target_table VARCHAR(64), row_count BIGINT, byte_count BIGINT NOT NULL, attempts INTEGER NOT NULL,
                error VARCHAR(65535), history VARCHAR(65535), claimed_by VARCHAR(256),
                first_seen_at TIMESTAMPTZ NOT NULL, loaded_at TIMESTAMPTZ, updated_at TIMESTAMPTZ NOT NULL
            )",
            self.options.ledger
        )))
        .execute(&self.pool)
        .await
        .map(|_| ())
    }

    pub async fn reset_failed(&self, source: &str, key: &str) -> Result<u64, sqlx::Error> {
        let sql = format!(
            "UPDATE {} SET state = 'pending', error = NULL, updated_at = $3 WHERE source = $1 AND object_key = $2 AND state = 'failed'",
            self.options.ledger
        );
        Ok(sqlx::query(AssertSqlSafe(sql))
            .bind(source)
            .bind(key)
            .bind(chrono::Utc::now())
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    pub async fn record_transient(&self, id: &str, stage: Stage, message: &str) -> Result<(), sqlx::Error> {
        let ledger = &self.options.ledger;
        let mut tx = self.pool.begin().await?;
        sqlx::query(AssertSqlSafe(format!("LOCK {ledger}")))
            .execute(&mut *tx)
            .await?;
        let history: Option<(Option<String>,)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT history FROM {ledger} WHERE file_id = $1 AND state = 'pending'"
        )))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((history,)) = history {
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE {ledger} SET attempts = attempts + 1, history = $2, updated_at = $3 WHERE file_id = $1"
            )))
            .bind(id)
            .bind(append_history(history.as_deref(), stage, message))
            .bind(chrono::Utc::now())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    /// Loads a batch in one COPY. See the module docs.
    pub async fn load_batch(&self, source: &Source, batch: RedshiftBatch) -> BatchOutcome {
        match self.try_batch(source, &batch).await {
            Ok(outcomes) => outcomes,
            Err(e) => {
                let message = e.to_string();
                let stage = e.stage();
                batch
                    .files
                    .into_iter()
                    .map(|f| (f, Err(LoadError::transient(stage, &message))))
                    .collect()
            }
        }
    }

    async fn try_batch(&self, source: &Source, batch: &RedshiftBatch) -> Result<BatchOutcome, LoadError> {
        let (files, spec) = (batch.files.as_slice(), &batch.spec);
        let db = |e| db_error(e, Stage::Database);
        let ledger = &self.options.ledger;
        let table = match &spec.table {
            Ok(t) => t.clone(),
            Err(e) => {
                // No table: every file fails the same way, recorded like any failure.
                let mut tx = self.lock().await?;
                let mut out = Vec::new();
                for f in files {
                    self.ensure_row(&mut tx, source, f).await?;
                    self.set_failed(&mut tx, &super::file_id(source.id(), f), e, None)
                        .await?;
                    out.push((f.clone(), Ok(LoadOutcome::Failed(e.clone()))));
                }
                tx.commit().await.map_err(db)?;
                return Ok(out);
            }
        };
        // The columns and a sample from the first file (one route, one format: one header).
        let (columns, fixed, sample) = read_header(source, &files[0], spec).await?;
        let mut tx = self.lock().await?;
        let mut out: BatchOutcome = Vec::new();
        let mut todo: Vec<&ObjectMeta> = Vec::new();
        for f in files {
            self.ensure_row(&mut tx, source, f).await?;
            let id = super::file_id(source.id(), f);
            let (state, rows, error, attempts, history): super::LedgerRow = sqlx::query_as(AssertSqlSafe(format!(
                "SELECT state, row_count, error, CAST(attempts AS BIGINT), history FROM {ledger} WHERE file_id = $1"
            )))
            .bind(&id)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
            if let Some(done) = outcome_of_state(&state, rows, error) {
                out.push((f.clone(), Ok(done)));
            } else if attempts >= i64::from(self.options.max_attempts) {
                let error = retries_exhausted(attempts, history.as_deref());
                self.set_failed(&mut tx, &id, &error, Some(&table)).await?;
                out.push((f.clone(), Ok(LoadOutcome::Failed(error))));
            } else {
                todo.push(f);
            }
        }
        if todo.is_empty() {
            tx.commit().await.map_err(db)?;
            return Ok(out);
        }
        let names = file_columns(&columns)?;
        self.ensure_table(&mut tx, &table, &names, &fixed, sample.as_ref(), spec)
            .await?;
        // The manifest goes to the bucket before the COPY that reads it.
        let entries: Vec<(String, u64)> = todo
            .iter()
            .map(|f| (source.location(INCOMING, &f.key), f.size))
            .collect();
        let manifest = Manifest::of(&entries);
        let manifest_path = format!(
            "{}{table}/{}-{}.manifest",
            self.config.manifest_prefix,
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"),
            &super::file_id(source.id(), todo[0])[..16]
        );
        source
            .put(&manifest_path, serde_json::to_vec_pretty(&manifest).unwrap_or_default())
            .await
            .map_err(|e| e.into_load_error(Stage::Report))?;
        let statement = copy_statement(
            &table,
            &names,
            &source.location("", &manifest_path),
            &self.config,
            batch.format,
            &spec.format,
            batch.compression,
        );
        let copied = match self.config.copy {
            CopyMode::Redshift => self.copy_redshift(&mut tx, &statement).await?,
            #[cfg(feature = "redshift-emulation")]
            CopyMode::PostgresEmulation => {
                emulate_copy(&mut tx, source, &table, &names, &manifest, spec, &todo).await?
            }
        };
        match copied {
            Copied::Rows(rows_by_url) => {
                for f in &todo {
                    let id = super::file_id(source.id(), f);
                    let rows = rows_by_url
                        .get(&source.location(INCOMING, &f.key))
                        .copied()
                        .unwrap_or(0);
                    sqlx::query(AssertSqlSafe(format!(
                        "UPDATE {ledger} SET state = 'loaded', row_count = $2, target_table = $3, error = NULL,
                         attempts = attempts + 1, claimed_by = $4, loaded_at = $5, updated_at = $5 WHERE file_id = $1"
                    )))
                    .bind(&id)
                    .bind(rows as i64)
                    .bind(&table)
                    .bind(&self.options.owner)
                    .bind(chrono::Utc::now())
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                    out.push(((*f).clone(), Ok(LoadOutcome::Loaded { rows })));
                }
                tx.commit().await.map_err(db)?;
            }
            Copied::Rejected(bad) => {
                // The COPY rolled back whole: record the files it named as failed, in a new
                // transaction; the others are left pending for the next tick.
                drop(tx);
                let mut tx = self.lock().await?;
                for f in &todo {
                    let url = source.location(INCOMING, &f.key);
                    match bad.get(&url) {
                        Some(error) => {
                            self.set_failed(&mut tx, &super::file_id(source.id(), f), error, Some(&table))
                                .await?;
                            out.push(((*f).clone(), Ok(LoadOutcome::Failed(error.clone()))));
                        }
                        None => out.push((
                            (*f).clone(),
                            Err(LoadError::transient(
                                Stage::Database,
                                "another file of its batch failed the COPY; retried next tick",
                            )),
                        )),
                    }
                }
                tx.commit().await.map_err(db)?;
            }
        }
        Ok(out)
    }

    /// A transaction holding the ledger's lock: replicas take turns.
    async fn lock(&self) -> Result<Transaction<'static, Postgres>, LoadError> {
        let db = |e| db_error(e, Stage::Database);
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query(AssertSqlSafe(format!("LOCK {}", self.options.ledger)))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        Ok(tx)
    }

    async fn ensure_row(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        source: &Source,
        f: &ObjectMeta,
    ) -> Result<(), LoadError> {
        let ledger = &self.options.ledger;
        let now = chrono::Utc::now();
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {ledger} (file_id, source, object_key, etag, state, byte_count, attempts, first_seen_at, updated_at)
             SELECT $1, $2, $3, $4, 'pending', $5, 0, $6, $6 WHERE NOT EXISTS (SELECT 1 FROM {ledger} WHERE file_id = $1)"
        )))
        .bind(super::file_id(source.id(), f))
        .bind(source.id())
        .bind(&f.key)
        .bind(&f.etag)
        .bind(f.size as i64)
        .bind(now)
        .execute(&mut **tx)
        .await
        .map_err(|e| db_error(e, Stage::Database))?;
        Ok(())
    }

    async fn set_failed(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        id: &str,
        error: &FileError,
        table: Option<&String>,
    ) -> Result<(), LoadError> {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET state = 'failed', error = $2, target_table = $3, attempts = attempts + 1, claimed_by = $4,
             updated_at = $5 WHERE file_id = $1",
            self.options.ledger
        )))
        .bind(id)
        .bind(serde_json::to_string(error).unwrap_or_default())
        .bind(table)
        .bind(&self.options.owner)
        .bind(chrono::Utc::now())
        .execute(&mut **tx)
        .await
        .map_err(|e| db_error(e, Stage::Database))?;
        Ok(())
    }

    async fn ensure_table(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        table: &str,
        columns: &[String],
        fixed: &[Option<ColumnType>],
        sample: Option<&format::Batch>,
        spec: &LoadSpec,
    ) -> Result<(), LoadError> {
        let db = |e| db_error(e, Stage::Database);
        let existing: Vec<(String,)> = sqlx::query_as(
            "SELECT CAST(column_name AS VARCHAR) FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1",
        )
        .bind(table)
        .fetch_all(&mut **tx)
        .await
        .map_err(db)?;
        if !existing.is_empty() {
            let missing: Vec<&str> = columns
                .iter()
                .map(String::as_str)
                .filter(|c| !existing.iter().any(|(e,)| e == c))
                .collect();
            if let Some(first) = missing.first() {
                return Err(LoadError::Permanent(
                    FileError::new(
                        FileErrorKind::Schema,
                        format!("column(s) {} are not in table {table:?}", missing.join(", ")),
                    )
                    .in_column(*first),
                ));
            }
            return Ok(());
        }
        if !spec.create_tables {
            return Err(LoadError::Permanent(FileError::new(
                FileErrorKind::Schema,
                format!("table {table:?} does not exist and creating tables is off"),
            )));
        }
        let mut inference = TypeInference::new(columns.len());
        if let Some(batch) = sample {
            for r in 0..batch.len() {
                for (i, v) in batch.row(r).enumerate() {
                    inference.observe(i, v);
                }
            }
        }
        let types = inference.finish();
        let definition = columns
            .iter()
            .zip(types)
            .enumerate()
            .map(|(i, (c, t))| {
                let t = fixed.get(i).copied().flatten().unwrap_or(t);
                format!("{} {}", quote_ident(c), sql_type(t))
            })
            .collect::<Vec<_>>()
            .join(", ");
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {} ({definition})",
            quote_ident(table)
        )))
        .execute(&mut **tx)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Runs the COPY; on failure asks `stl_load_errors` which file(s) it rejected.
    async fn copy_redshift(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        statement: &str,
    ) -> Result<Copied, LoadError> {
        let db = |e| db_error(e, Stage::Database);
        match sqlx::query(AssertSqlSafe(statement.to_string()))
            .execute(&mut **tx)
            .await
        {
            Ok(_) => {
                let rows: Vec<(String, i64)> = sqlx::query_as(
                    "SELECT TRIM(filename), CAST(SUM(lines_scanned) AS BIGINT) FROM stl_load_commits
                     WHERE query = pg_last_copy_id() GROUP BY 1",
                )
                .fetch_all(&mut **tx)
                .await
                .map_err(db)?;
                Ok(Copied::Rows(
                    rows.into_iter().map(|(f, n)| (f, n.max(0) as u64)).collect(),
                ))
            }
            Err(e) => {
                let message = e.to_string();
                // The transaction is aborted; stl_load_errors is read on another connection.
                let errors: Vec<(String, i64, String, String)> = sqlx::query_as(
                    "SELECT TRIM(filename), CAST(line_number AS BIGINT), TRIM(colname), TRIM(err_reason) FROM stl_load_errors
                     WHERE query = (SELECT MAX(query) FROM stl_load_errors WHERE session = pg_backend_pid()) ORDER BY starttime",
                )
                .fetch_all(&self.pool)
                .await
                .unwrap_or_default();
                if errors.is_empty() {
                    return Err(LoadError::transient(Stage::Database, message));
                }
                let mut bad = HashMap::new();
                for (file, line, column, reason) in errors {
                    bad.entry(file).or_insert_with(|| {
                        let mut e =
                            FileError::new(FileErrorKind::Database, format!("Redshift rejected the file: {reason}"))
                                .at_line(Some(line.max(0) as u64));
                        if !column.is_empty() {
                            e = e.in_column(column);
                        }
                        e.database_message = Some(reason);
                        e
                    });
                }
                Ok(Copied::Rejected(bad))
            }
        }
    }
}

/// What a COPY did: rows per file URL, or the files it rejected.
enum Copied {
    Rows(HashMap<String, u64>),
    Rejected(HashMap<String, FileError>),
}

/// The header, the types the format fixes and a sample of the first file.
async fn read_header(
    source: &Source,
    file: &ObjectMeta,
    spec: &LoadSpec,
) -> Result<(Vec<String>, Vec<Option<ColumnType>>, Option<format::Batch>), LoadError> {
    let mut decoded = FileReader::new(source, file, &spec.format).rows().await?;
    let sample = decoded.next_batch().await.map_err(LoadError::from)?;
    Ok((decoded.header, decoded.types, sample))
}

#[cfg(feature = "redshift-emulation")]
/// Tests only: what `COPY … FROM 's3://…manifest'` does, done with PostgreSQL's COPY FROM STDIN
/// for each file the manifest lists (read back from the store), in the same transaction.
async fn emulate_copy(
    tx: &mut Transaction<'static, Postgres>,
    source: &Source,
    table: &str,
    columns: &[String],
    manifest: &Manifest,
    spec: &LoadSpec,
    files: &[&ObjectMeta],
) -> Result<Copied, LoadError> {
    let mut rows = HashMap::new();
    for entry in &manifest.entries {
        let Some(file) = files.iter().find(|f| source.location(INCOMING, &f.key) == entry.url) else {
            return Err(LoadError::transient(
                Stage::Database,
                format!("manifest entry {} is not in the batch", entry.url),
            ));
        };
        sqlx::query("SAVEPOINT emulated_copy")
            .execute(&mut **tx)
            .await
            .map_err(|e| db_error(e, Stage::Database))?;
        let mut decoded = match FileReader::new(source, file, &spec.format).rows().await {
            Ok(d) => d,
            Err(LoadError::Permanent(fe)) => return Ok(Copied::Rejected(HashMap::from([(entry.url.clone(), fe)]))),
            Err(t) => return Err(t),
        };
        let statement = format!(
            "COPY {} ({}) FROM STDIN WITH (FORMAT csv)",
            quote_ident(table),
            columns.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ")
        );
        let mut copy = tx
            .copy_in_raw(&statement)
            .await
            .map_err(|e| db_error(e, Stage::Database))?;
        let mut buffer = Vec::new();
        let mut failed = None;
        loop {
            match decoded.next_batch().await {
                Ok(Some(b)) => {
                    buffer.clear();
                    super::postgres::encode_csv(&b, None, &mut buffer);
                    if let Err(e) = copy.send(buffer.as_slice()).await {
                        failed = Some(db_error(e, Stage::Database));
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    failed = Some(LoadError::from(e));
                    break;
                }
            }
        }
        let result = match failed {
            Some(e) => {
                let _ = copy.abort("rejected").await;
                Err(e)
            }
            None => copy.finish().await.map_err(|e| db_error(e, Stage::Database)),
        };
        match result {
            Ok(n) => {
                rows.insert(entry.url.clone(), n);
            }
            Err(LoadError::Permanent(fe)) => return Ok(Copied::Rejected(HashMap::from([(entry.url.clone(), fe)]))),
            Err(t) => return Err(t),
        }
    }
    Ok(Copied::Rows(rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_holds_only_files_one_copy_can_load() {
        let routes = Routes::new(&Config::default());
        let file = |key: &str| ObjectMeta {
            key: key.into(),
            etag: "\"e\"".into(),
            size: 1,
            last_modified: chrono::Utc::now(),
        };
        let keys = [
            "orders/a.csv",
            "orders/b.csv.gz",
            "orders/c.csv",
            "events/d.jsonl",
            "orders/e.csv.gz",
        ];
        let batches = RedshiftBatch::group(keys.iter().map(|k| file(k)).collect(), &routes);
        let grouped: Vec<(Vec<&str>, Format, Compression)> = batches
            .iter()
            .map(|b| {
                (
                    b.files.iter().map(|f| f.key.as_str()).collect(),
                    b.format,
                    b.compression,
                )
            })
            .collect();
        assert_eq!(
            grouped,
            vec![
                (vec!["orders/a.csv", "orders/c.csv"], Format::Csv, Compression::None),
                (
                    vec!["orders/b.csv.gz", "orders/e.csv.gz"],
                    Format::Csv,
                    Compression::Gzip
                ),
                (vec!["events/d.jsonl"], Format::Jsonl, Compression::None),
            ]
        );
        assert_eq!(batches[2].spec.table.as_deref().ok(), Some("events"));
    }

    fn config() -> RedshiftConfig {
        RedshiftConfig {
            iam_role: "arn:aws:iam::123456789012:role/loader".into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_copy_statement_follows_format_compression_and_options() {
        let cols = vec!["id".to_string(), "name".to_string()];
        let url = "s3://b/manifests/orders/x.manifest";
        let csv = FormatOptions::default();
        assert_eq!(
            copy_statement("orders", &cols, url, &config(), Format::Csv, &csv, Compression::None),
            "COPY \"orders\" (\"id\", \"name\") FROM 's3://b/manifests/orders/x.manifest' IAM_ROLE \
             'arn:aws:iam::123456789012:role/loader' MANIFEST FORMAT AS CSV DELIMITER ',' QUOTE AS '\"' IGNOREHEADER 1 \
             EMPTYASNULL DATEFORMAT 'auto' TIMEFORMAT 'auto' COMPUPDATE OFF STATUPDATE OFF"
        );
        let tsv = FormatOptions {
            null: "\\N".into(),
            ..FormatOptions::default()
        };
        let sql = copy_statement("t", &cols, url, &config(), Format::Tsv, &tsv, Compression::Gzip);
        assert!(
            sql.contains("DELIMITER '\t' QUOTE AS '\"' IGNOREHEADER 1 NULL AS '\\\\N' GZIP"),
            "{sql}"
        );
        let headerless = FormatOptions {
            header: false,
            quote: b'\'',
            ..FormatOptions::default()
        };
        let sql = copy_statement("t", &cols, url, &config(), Format::Csv, &headerless, Compression::Zstd);
        assert!(
            sql.contains("QUOTE AS '''' EMPTYASNULL ZSTD") && !sql.contains("IGNOREHEADER"),
            "{sql}"
        );
        let mut regional = config();
        regional.region = Some("eu-west-1".into());
        let sql = copy_statement("t", &cols, url, &regional, Format::Jsonl, &csv, Compression::None);
        assert!(
            sql.contains("MANIFEST FORMAT AS JSON 'auto' REGION 'eu-west-1'"),
            "{sql}"
        );
    }

    #[test]
    fn the_manifest_lists_every_file_as_mandatory_with_its_size() {
        let m = Manifest::of(&[
            ("s3://b/incoming/t/a.csv".into(), 10),
            ("s3://b/incoming/t/b.csv.gz".into(), 20),
        ]);
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            serde_json::json!({"entries": [
                {"url": "s3://b/incoming/t/a.csv", "mandatory": true, "meta": {"content_length": 10}},
                {"url": "s3://b/incoming/t/b.csv.gz", "mandatory": true, "meta": {"content_length": 20}}
            ]})
        );
    }

    #[test]
    fn the_iam_role_and_prefix_are_checked() {
        assert!(config().problems().is_empty());
        let bad = RedshiftConfig {
            iam_role: "arn:aws:iam::1:role/x' --".into(),
            manifest_prefix: "m".into(),
            ..config()
        };
        let problems = bad.problems();
        assert!(problems[0].starts_with("redshift.iam_role") && problems[1].starts_with("redshift.manifest_prefix"));
        assert_eq!(literal("it's \\ here"), "'it''s \\\\ here'");
    }
}
