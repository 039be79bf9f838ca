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

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Postgres, Transaction};

mod copy;
mod ledger;

use self::copy::{Copied, read_header};
pub use self::copy::{Manifest, ManifestEntry, ManifestMeta, copy_statement, sql_type};
use super::{LoadOutcome, SinkOptions, db_error, file_columns, quote_ident};
use crate::config::Config;
use crate::config::redshift::{CopyMode, RedshiftConfig};
use crate::error::{FileError, FileErrorKind, LoadError, Stage};
use crate::format::{self, Compression, Format};
use crate::routes::{LoadSpec, Routes};
use crate::schema::{ColumnType, TypeInference};
use crate::source::{INCOMING, ObjectMeta, Source};

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

    /// One COPY for the batch's files that still need loading, in one transaction under the
    /// ledger's lock: settle what the ledger already knows, create the table, write the
    /// manifest, COPY, then record each file's outcome.
    async fn try_batch(&self, source: &Source, batch: &RedshiftBatch) -> Result<BatchOutcome, LoadError> {
        let table = match &batch.spec.table {
            Ok(t) => t.clone(),
            Err(e) => return self.fail_all(source, &batch.files, e).await,
        };
        let mut tx = self.lock().await?;
        let (mut out, todo) = self.pending(&mut tx, source, &batch.files, &table).await?;
        // The attempts count now, committed before anything is read (as for every database):
        // a load that fails to read, or kills the process, still counts, so such files end in
        // failed/ after retry.max_attempts.
        for f in &todo {
            self.count_attempt(&mut tx, &super::file_id(source.id(), f)).await?;
        }
        tx.commit().await.map_err(db)?;
        if todo.is_empty() {
            return Ok(out);
        }
        // The columns and a sample from the first file to load (one route, one format: one
        // header), read outside the ledger's lock.
        let (columns, fixed, sample) = read_header(source, todo[0], &batch.spec).await?;
        let mut tx = self.lock().await?;
        // Between the two transactions another replica may have loaded some of them.
        let (settled, todo) = self.still_pending(&mut tx, source, todo).await?;
        out.extend(settled);
        if todo.is_empty() {
            tx.commit().await.map_err(db)?;
            return Ok(out);
        }
        let names = file_columns(&columns)?;
        self.ensure_table(&mut tx, &table, &names, &fixed, sample.as_ref(), &batch.spec)
            .await?;
        let (manifest, manifest_path) = self.write_manifest(source, &table, &todo).await?;
        let statement = copy_statement(
            &table,
            &names,
            &source.location("", &manifest_path),
            &self.config,
            batch.format,
            &batch.spec.format,
            batch.compression,
        );
        let copied = match self.config.copy {
            CopyMode::Redshift => self.copy_redshift(&mut tx, &statement).await?,
            #[cfg(feature = "redshift-emulation")]
            CopyMode::PostgresEmulation => {
                copy::emulate_copy(&mut tx, source, &table, &names, &manifest, &batch.spec, &todo).await?
            }
        };
        #[cfg(not(feature = "redshift-emulation"))]
        let _ = &manifest;
        match copied {
            Copied::Rows(rows_by_url) => {
                for f in &todo {
                    let url = source.location(INCOMING, &f.key);
                    let rows = rows_by_url.get(&url).copied().unwrap_or(0);
                    self.set_loaded(&mut tx, &super::file_id(source.id(), f), rows, &table)
                        .await?;
                    out.push(((*f).clone(), Ok(LoadOutcome::Loaded { rows })));
                }
                tx.commit().await.map_err(db)?;
            }
            Copied::Rejected(bad) => {
                // The COPY rolled back whole: record the files it named as failed, in a new
                // transaction; the others are left pending for the next tick.
                drop(tx);
                out.extend(self.record_rejected(source, &todo, &bad, &table).await?);
            }
        }
        Ok(out)
    }

    /// No table for the batch: every file fails the same way, recorded like any failure.
    async fn fail_all(
        &self,
        source: &Source,
        files: &[ObjectMeta],
        error: &FileError,
    ) -> Result<BatchOutcome, LoadError> {
        let mut tx = self.lock().await?;
        let mut out = Vec::new();
        for f in files {
            self.ensure_row(&mut tx, source, f).await?;
            let id = super::file_id(source.id(), f);
            self.count_attempt(&mut tx, &id).await?;
            self.set_failed(&mut tx, &id, error, None).await?;
            out.push((f.clone(), Ok(LoadOutcome::Failed(error.clone()))));
        }
        tx.commit().await.map_err(db)?;
        Ok(out)
    }

    /// The manifest goes to the bucket before the COPY that reads it; returns it and its key.
    async fn write_manifest(
        &self,
        source: &Source,
        table: &str,
        todo: &[&ObjectMeta],
    ) -> Result<(Manifest, String), LoadError> {
        let entries: Vec<(String, u64)> = todo
            .iter()
            .map(|f| (source.location(INCOMING, &f.key), f.size))
            .collect();
        let manifest = Manifest::of(&entries);
        let path = format!(
            "{}{table}/{}-{}.manifest",
            self.config.manifest_prefix,
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"),
            &super::file_id(source.id(), todo[0])[..16]
        );
        source
            .put(&path, serde_json::to_vec_pretty(&manifest).unwrap_or_default())
            .await
            .map_err(|e| e.into_load_error(Stage::Report))?;
        Ok((manifest, path))
    }

    /// After a COPY that rejected files: those it named are failed; the others stay pending.
    async fn record_rejected(
        &self,
        source: &Source,
        todo: &[&ObjectMeta],
        bad: &HashMap<String, FileError>,
        table: &String,
    ) -> Result<BatchOutcome, LoadError> {
        let mut tx = self.lock().await?;
        let mut out = Vec::new();
        for f in todo {
            match bad.get(&source.location(INCOMING, &f.key)) {
                Some(error) => {
                    self.set_failed(&mut tx, &super::file_id(source.id(), f), error, Some(table))
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
        Ok(out)
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

fn db(e: sqlx::Error) -> LoadError {
    db_error(e, Stage::Database)
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
}
