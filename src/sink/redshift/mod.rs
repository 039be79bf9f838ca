//! Amazon Redshift, by its own fast path: per tick and per target table, the batch's files are
//! first checked one by one (header, columns, a sample: a file with a permanent problem fails
//! alone) and grouped by header; for each group one manifest object listing its files is written
//! to the bucket, then ONE transaction locks the ledger, runs `COPY table FROM
//! 's3://…/manifest' IAM_ROLE … MANIFEST`, checks that every key still holds the version that was
//! listed, marks the files loaded with the row counts Redshift reports, and commits; only then
//! are the files moved. Redshift has no `SKIP LOCKED`: `LOCK` on the ledger makes replicas take
//! turns, which suits its batch loading. A COPY that fails names the bad file in its own
//! session's rows of `stl_load_errors`, read on the COPY's connection after the rollback: that
//! file is recorded as failed, and the others are loaded again at once (see [`group`]).
//!
//! CSV files are mapped to columns by position, as Redshift does, which is why a group's files
//! share one header. JSON files are mapped by a JSONPaths file written beside the manifest, one
//! path per column holding the key as the files spell it.
//!
//! Redshift cannot run where this project is tested. The SQL and the manifest are checked by
//! unit tests; the transaction flow runs in the tests against PostgreSQL, with
//! `redshift.copy = "postgres-emulation"` standing in for the one statement PostgreSQL does not
//! have (COPY from S3 by manifest) and for the two system tables the flow reads: it reads the
//! manifest back from the store and copies each listed file into the table, inside the same
//! transaction, mapping fields as Redshift does (CSV by position, JSON by its paths), and
//! records a rejected file in a `stl_load_errors` table under the COPY's session, on another
//! connection, as Redshift's own log does. Nothing else differs. The emulation is compiled only
//! with the `redshift-emulation` feature, which the tests enable; the released binary does not
//! have it.

use std::collections::HashMap;
use std::str::FromStr;

use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

mod copy;
mod group;
mod ledger;

use self::copy::read_header;
pub use self::copy::{Manifest, ManifestEntry, ManifestMeta, copy_statement, json_paths, sql_type};
use self::group::Group;
use super::{LoadOutcome, SinkOptions, db_error, file_columns, quote_ident};
use crate::config::Config;
use crate::config::redshift::RedshiftConfig;
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

    pub(crate) fn connect_options(&self) -> std::sync::Arc<PgConnectOptions> {
        self.pool.connect_options()
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ())
    }

    /// See [`super::Database::table_shape`].
    pub(crate) async fn table_shape(&self, table: &str) -> Result<Option<super::TableShape>, LoadError> {
        let mut conn = self.pool.acquire().await.map_err(|e| db_error(e, Stage::Database))?;
        super::postgres::table_info(&mut conn, table).await
    }

    pub async fn close(&self) {
        self.pool.close().await
    }

    /// Loads a batch: each file is checked on its own, then one COPY per group of files with
    /// the same header. See the module docs.
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

    /// Settles what the ledger already knows and counts the attempts; then reads each file's
    /// header and a sample (outside the ledger's lock): a file with a permanent problem fails
    /// alone, and the others are grouped by header, each group loaded by one COPY.
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
        let mut groups: Vec<Group> = Vec::new();
        let mut bad = Vec::new();
        for f in todo {
            let checked = read_header(source, f, &batch.spec)
                .await
                .and_then(|(header, fixed, sample)| Ok((file_columns(&header)?, header, fixed, sample)));
            match checked {
                Ok((columns, header, fixed, sample)) => match groups.iter_mut().find(|g| g.header == header) {
                    Some(group) => group.files.push(f),
                    None => groups.push(Group {
                        header,
                        columns,
                        fixed,
                        sample,
                        files: vec![f],
                    }),
                },
                Err(LoadError::Permanent(e)) => bad.push((f, e)),
                Err(e) => out.push((f.clone(), Err(e))),
            }
        }
        if !bad.is_empty() {
            out.extend(self.record_failed(source, &bad, Some(&table)).await?);
        }
        for group in &groups {
            match self.load_group(source, batch, &table, group).await {
                Ok(done) => out.extend(done),
                Err(LoadError::Permanent(e)) => {
                    let bad: Vec<_> = group.files.iter().map(|f| (*f, e.clone())).collect();
                    out.extend(self.record_failed(source, &bad, Some(&table)).await?);
                }
                Err(e) => {
                    let (stage, message) = (e.stage(), e.to_string());
                    out.extend(
                        group
                            .files
                            .iter()
                            .map(|f| ((*f).clone(), Err(LoadError::transient(stage, &message)))),
                    );
                }
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

    /// Beside the manifest, the JSONPaths file of a JSON COPY: one path per column, each the
    /// key as the files write it (so `Amount` fills column `amount`, which `'auto'` would
    /// leave NULL). Returns its key and the keys.
    async fn write_json_paths(
        &self,
        source: &Source,
        manifest_path: &str,
        keys: &[String],
    ) -> Result<(String, Vec<String>), LoadError> {
        let path = format!("{}.jsonpaths", manifest_path.trim_end_matches(".manifest"));
        source
            .put(&path, json_paths(keys).into_bytes())
            .await
            .map_err(|e| e.into_load_error(Stage::Report))?;
        Ok((path, keys.to_vec()))
    }

    async fn ensure_table(
        &self,
        tx: &mut PgConnection,
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
        .fetch_all(&mut *tx)
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
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Runs the COPY; the rows it loaded per file, from `stl_load_commits`.
    pub(super) async fn copy_redshift(
        &self,
        tx: &mut PgConnection,
        statement: &str,
    ) -> Result<HashMap<String, u64>, LoadError> {
        sqlx::query(AssertSqlSafe(statement.to_string()))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT TRIM(filename), CAST(SUM(lines_scanned) AS BIGINT) FROM stl_load_commits
             WHERE query = pg_last_copy_id() GROUP BY 1",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        Ok(rows.into_iter().map(|(f, n)| (f, n.max(0) as u64)).collect())
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
