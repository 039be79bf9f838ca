//! A batch's groups: files with the same header, loaded by one COPY each. A COPY that Redshift
//! rejects is followed, on the same connection, by a look at its own session's rows in
//! `stl_load_errors`, which name the bad file: that file alone fails, the others are loaded
//! again at once.

use std::collections::HashMap;

use sqlx::postgres::PgConnection;

use super::copy::{CopyInput, copy_statement};
use super::{BatchOutcome, RedshiftBatch, RedshiftSink, db};
use crate::config::redshift::CopyMode;
use crate::error::{FileError, FileErrorKind, LoadError, Stage};
use crate::format::{self, Format};
use crate::schema::ColumnType;
use crate::sink::{LoadOutcome, file_id};
use crate::source::{INCOMING, ObjectMeta, Source};

/// Files of a batch that one COPY loads together: the same header as written, so that the
/// COPY's column list (CSV maps fields by position) or its JSON paths fit every file.
pub(super) struct Group<'f> {
    /// As the files write it (JSON keys keep their case).
    pub header: Vec<String>,
    /// The header as column names.
    pub columns: Vec<String>,
    /// The types the format fixes, per column.
    pub fixed: Vec<Option<ColumnType>>,
    /// The first file's first rows, for the types of a table to create.
    pub sample: Option<format::Batch>,
    pub files: Vec<&'f ObjectMeta>,
}

/// What one COPY of a group came to.
enum Copied<'f> {
    /// Loaded and committed (with the files found settled by another loader).
    Loaded(BatchOutcome),
    /// Rolled back: the files Redshift named, with their errors, and the others.
    Rejected {
        done: BatchOutcome,
        bad: Vec<(&'f ObjectMeta, FileError)>,
        rest: Vec<&'f ObjectMeta>,
    },
}

impl RedshiftSink {
    /// A group's files, by as many COPYs as it takes: a COPY that Redshift rejects names the bad
    /// file in `stl_load_errors`; that file is recorded as failed and the others are loaded
    /// again at once, without it.
    pub(super) async fn load_group(
        &self,
        source: &Source,
        batch: &RedshiftBatch,
        table: &str,
        group: &Group<'_>,
    ) -> Result<BatchOutcome, LoadError> {
        let mut out = Vec::new();
        let mut todo = group.files.clone();
        while !todo.is_empty() {
            match self.copy_group(source, batch, table, group, todo).await? {
                Copied::Loaded(done) => {
                    out.extend(done);
                    break;
                }
                Copied::Rejected { done, bad, rest } => {
                    out.extend(done);
                    out.extend(self.record_failed(source, &bad, Some(&table.to_string())).await?);
                    todo = rest;
                }
            }
        }
        Ok(out)
    }

    /// One COPY of `todo` (files of `group`) in one transaction under the ledger's lock: the
    /// table, the manifest, the COPY, each file's row count. Every step runs on one connection,
    /// so that after a failed COPY the load errors of its own session can be read.
    async fn copy_group<'f>(
        &self,
        source: &Source,
        batch: &RedshiftBatch,
        table: &str,
        group: &Group<'f>,
        todo: Vec<&'f ObjectMeta>,
    ) -> Result<Copied<'f>, LoadError> {
        let mut conn = self.pool.acquire().await.map_err(db)?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await.map_err(db)?;
        self.lock_ledger(&mut tx).await?;
        // Between the transactions another replica may have loaded some of them.
        let (mut done, todo) = self.still_pending(&mut tx, source, todo).await?;
        if todo.is_empty() {
            tx.commit().await.map_err(db)?;
            return Ok(Copied::Loaded(done));
        }
        self.ensure_table(
            &mut tx,
            table,
            &group.columns,
            &group.fixed,
            group.sample.as_ref(),
            &batch.spec,
        )
        .await?;
        let (manifest, manifest_path) = self.write_manifest(source, table, &todo).await?;
        let json_paths = match batch.format {
            Format::Jsonl => Some(self.write_json_paths(source, &manifest_path, &group.header).await?),
            Format::Csv | Format::Tsv => None,
        };
        let manifest_url = source.location("", &manifest_path);
        let json_paths_url = json_paths.as_ref().map(|(path, _)| source.location("", path));
        let input = CopyInput {
            manifest_url: &manifest_url,
            json_paths_url: json_paths_url.as_deref(),
            format: batch.format,
            options: &batch.spec.format,
            compression: batch.compression,
        };
        let statement = copy_statement(table, &group.columns, &input, &self.config);
        // This session, and the last load error it has seen so far.
        let (session, seen): (i32, i64) = sqlx::query_as(
            "SELECT pg_backend_pid(), CAST(COALESCE(MAX(query), 0) AS BIGINT) FROM stl_load_errors WHERE session = pg_backend_pid()",
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        let copied = match self.config.copy {
            CopyMode::Redshift => self.copy_redshift(&mut tx, &statement).await,
            #[cfg(feature = "redshift-emulation")]
            CopyMode::PostgresEmulation => {
                let paths = json_paths.as_ref().map(|(_, keys)| keys.as_slice());
                let emulated = super::copy::Emulated {
                    pool: &self.pool,
                    session,
                    table,
                    columns: &group.columns,
                    json_paths: paths,
                };
                emulated.run(&mut tx, source, &manifest, &batch.spec, &todo).await
            }
        };
        #[cfg(not(feature = "redshift-emulation"))]
        let _ = (&manifest, session);
        let rows_by_url = match copied {
            Ok(rows) => rows,
            Err(e) => {
                // The transaction is aborted: roll it back, then ask this session's load errors
                // which file(s) the COPY rejected.
                tx.rollback().await.map_err(db)?;
                let bad = self.rejected_files(&mut conn, seen, source, &todo).await?;
                if bad.is_empty() {
                    return Err(LoadError::transient(Stage::Database, e.to_string()));
                }
                let (bad, rest): (Vec<_>, Vec<_>) = todo
                    .into_iter()
                    .map(|f| (f, bad.get(&source.location(INCOMING, &f.key)).cloned()))
                    .partition(|(_, e)| e.is_some());
                return Ok(Copied::Rejected {
                    done,
                    bad: bad.into_iter().filter_map(|(f, e)| Some((f, e?))).collect(),
                    rest: rest.into_iter().map(|(f, _)| f).collect(),
                });
            }
        };
        // COPY reads whatever each key holds when it runs: a file overwritten since it was
        // listed would load under the listed version's ETag. Each key still holding its listed
        // version now means the COPY read that version; otherwise none of this commits and the
        // files are listed again.
        for f in &todo {
            let now = source
                .etag_at(&format!("{INCOMING}{}", f.key))
                .await
                .map_err(|e| e.into_load_error(Stage::Get))?;
            if now.as_deref() != Some(f.etag.as_str()) {
                return Err(LoadError::transient(
                    Stage::Get,
                    format!(
                        "{} changed while its batch loaded; the batch is rolled back and loaded again",
                        f.key
                    ),
                ));
            }
        }
        for f in &todo {
            let url = source.location(INCOMING, &f.key);
            let rows = rows_by_url.get(&url).copied().unwrap_or(0);
            self.set_loaded(&mut tx, &file_id(source.id(), f), rows, table).await?;
            done.push(((*f).clone(), Ok(LoadOutcome::Loaded { rows })));
        }
        tx.commit().await.map_err(db)?;
        Ok(Copied::Loaded(done))
    }

    /// Files that failed on their own: recorded as failed (unless another replica settled them
    /// in the meantime).
    pub(super) async fn record_failed(
        &self,
        source: &Source,
        bad: &[(&ObjectMeta, FileError)],
        table: Option<&String>,
    ) -> Result<BatchOutcome, LoadError> {
        let mut tx = self.lock().await?;
        let files = bad.iter().map(|(f, _)| *f).collect();
        let (mut out, pending) = self.still_pending(&mut tx, source, files).await?;
        for (f, error) in bad {
            if pending.iter().any(|p| std::ptr::eq(*p, *f)) {
                self.set_failed(&mut tx, &file_id(source.id(), f), error, table).await?;
                out.push(((*f).clone(), Ok(LoadOutcome::Failed(error.clone()))));
            }
        }
        tx.commit().await.map_err(db)?;
        Ok(out)
    }

    /// After a failed COPY, on its connection (its transaction rolled back): the files its
    /// session's new rows in `stl_load_errors` name, with the first error of each.
    async fn rejected_files(
        &self,
        conn: &mut PgConnection,
        seen: i64,
        source: &Source,
        todo: &[&ObjectMeta],
    ) -> Result<HashMap<String, FileError>, LoadError> {
        let errors: Vec<(String, i64, String, String)> = sqlx::query_as(
            "SELECT TRIM(filename), CAST(line_number AS BIGINT), TRIM(colname), TRIM(err_reason) FROM stl_load_errors
             WHERE session = pg_backend_pid() AND query > $1 ORDER BY query, starttime",
        )
        .bind(seen)
        .fetch_all(&mut *conn)
        .await
        .map_err(db)?;
        let ours: Vec<String> = todo.iter().map(|f| source.location(INCOMING, &f.key)).collect();
        let mut bad = HashMap::new();
        for (file, line, column, reason) in errors {
            if !ours.contains(&file) {
                continue;
            }
            bad.entry(file).or_insert_with(|| {
                let mut e = FileError::new(FileErrorKind::Database, format!("Redshift rejected the file: {reason}"))
                    .at_line((line > 0).then_some(line as u64));
                if !column.is_empty() {
                    e = e.in_column(column);
                }
                e.database_message = Some(reason);
                e
            });
        }
        Ok(bad)
    }
}
