//! One file's journey, once the scheduler handed it over: load it exactly once (see
//! [`crate::sink`]), then move it to `processed/`, or write its report and move it to `failed/`.
//! The move always comes after the commit: a crash in between leaves a committed file in
//! `incoming/`, which the next attempt finds in the ledger and only moves.

use std::sync::Arc;

use chrono::Utc;
use tracing::{Instrument, info, warn};

use crate::error::{FileError, LoadError, Stage};
use crate::reader::FileReader;
use crate::report::{self, FailureReportFile};
use crate::routes::Routes;
use crate::sink::protocol::GroupMember;
use crate::sink::redshift::RedshiftBatch;
use crate::sink::{Database, FileRef, LoadOutcome};
use crate::source::{Area, FAILED, INCOMING, MoveOutcome, ObjectMeta, Source};
use crate::status::Status;

/// How one file ended, this time.
#[derive(Debug, Clone, PartialEq)]
pub enum FileOutcome {
    /// Committed now and moved to `processed/`.
    Loaded { rows: u64 },
    /// Committed earlier; moved now.
    AlreadyLoaded,
    /// Moved to `failed/` with a report.
    Failed(FileError),
    /// Another worker or replica holds it.
    Busy,
    /// A transient error; it stays in `incoming/` for a later tick.
    Retry { stage: Stage, message: String },
    /// Not started because the loader is stopping.
    NotStarted,
}

/// What one worker task loads, decided once by the scheduler.
#[derive(Debug, Clone)]
pub enum Unit {
    File(ObjectMeta),
    /// Small files loaded in one transaction, each under its own savepoint (group commit).
    Group(Vec<ObjectMeta>),
    /// Files one Redshift COPY loads together.
    Batch(Box<RedshiftBatch>),
}

impl Unit {
    pub fn files(&self) -> &[ObjectMeta] {
        match self {
            Unit::File(obj) => std::slice::from_ref(obj),
            Unit::Group(objs) => objs,
            Unit::Batch(batch) => &batch.files,
        }
    }
}

/// Everything a worker needs; shared by all of them.
pub struct Worker {
    pub source: Arc<Source>,
    pub db: Arc<Database>,
    pub status: Arc<Status>,
    pub routes: Routes,
    /// `reports.include_values`: whether reports, status and logs may quote the file's data.
    pub include_values: bool,
}

impl Worker {
    /// Loads and moves one file. Logs its own outcome once.
    pub async fn process(&self, obj: &ObjectMeta) -> FileOutcome {
        let started = std::time::Instant::now();
        let outcome = settle(self.load_and_move(obj).await);
        self.record(obj, &outcome, started).await;
        outcome
    }

    /// Loads what the scheduler handed over: one file, or one batch.
    /// The unit with its files' versions, read now that its turn has come (a local file's
    /// content hash; an S3 object has its ETag from the listing). `None` when its file is gone.
    pub async fn identify(&self, unit: Unit) -> Option<Unit> {
        match unit {
            Unit::File(obj) => {
                let obj = self.source.identify(vec![obj]).await.pop()?;
                tracing::Span::current().record("file.etag", obj.etag.as_str());
                Some(Unit::File(obj))
            }
            Unit::Group(objs) => {
                let objs = self.source.identify(objs).await;
                (!objs.is_empty()).then_some(Unit::Group(objs))
            }
            // Batches are Redshift's, from S3: their ETags are their versions.
            Unit::Batch(batch) => Some(Unit::Batch(batch)),
        }
    }

    pub async fn process_unit(&self, unit: Unit) -> Vec<FileOutcome> {
        match unit {
            Unit::File(obj) => vec![self.process(&obj).await],
            Unit::Group(objs) => self.process_group(&objs).await,
            Unit::Batch(batch) => self.process_batch(*batch).await,
        }
    }

    /// Loads a group of files in one transaction, then moves each (after the commit, as for
    /// one file). Outcomes in the group's order.
    async fn process_group(&self, objs: &[ObjectMeta]) -> Vec<FileOutcome> {
        let started = std::time::Instant::now();
        let specs: Vec<_> = objs.iter().map(|o| self.routes.resolve(&o.key)).collect();
        let readers: Vec<FileReader<'_>> = objs
            .iter()
            .zip(&specs)
            .map(|(o, spec)| FileReader::new(&self.source, o, &spec.format).with_progress(self.status.progress(&o.key)))
            .collect();
        let members: Vec<GroupMember<'_>> = objs
            .iter()
            .zip(&specs)
            .zip(&readers)
            .map(|((o, spec), reader)| GroupMember {
                file: self.file_ref(o),
                spec,
                reader,
            })
            .collect();
        let results = self.db.load_group(&members).await;
        let committed = results
            .iter()
            .filter(|r| matches!(r, Some(Ok(LoadOutcome::Loaded { .. } | LoadOutcome::Failed(_)))))
            .count();
        info!(
            files = objs.len(),
            committed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "group loaded in one transaction"
        );
        let mut outcomes = Vec::with_capacity(objs.len());
        for (obj, result) in objs.iter().zip(results) {
            let span = tracing::info_span!("file", file.key = %obj.key, file.source = %self.source.id(), file.etag = %obj.etag);
            let outcome = match result {
                // Tried before without an outcome: alone, after the group's commit.
                None => self.process(obj).instrument(span).await,
                Some(result) => {
                    let outcome = match result {
                        Ok(loaded) => settle(self.finish(obj, loaded).instrument(span.clone()).await),
                        Err(e) => settle(Err(e)),
                    };
                    self.record(obj, &outcome, started).instrument(span).await;
                    outcome
                }
            };
            outcomes.push(outcome);
        }
        outcomes
    }

    /// Loads a batch of files of one table and format in one go (Redshift), then moves each.
    async fn process_batch(&self, batch: RedshiftBatch) -> Vec<FileOutcome> {
        let Some(sink) = self.db.batch_loader() else {
            // Only Redshift's sink loads batches; any other database loads them file by file.
            let mut outcomes = Vec::with_capacity(batch.files.len());
            for obj in &batch.files {
                outcomes.push(self.process(obj).await);
            }
            return outcomes;
        };
        let started = std::time::Instant::now();
        let order: Vec<String> = batch.files.iter().map(|f| f.key.clone()).collect();
        let span = tracing::info_span!("batch", files = batch.files.len(), db.table = ?batch.spec.table.as_ref().ok());
        let results = sink.load_batch(&self.source, batch).instrument(span).await;
        let mut by_key = std::collections::HashMap::with_capacity(results.len());
        for (obj, result) in results {
            let span = tracing::info_span!("file", file.key = %obj.key, file.source = %self.source.id());
            let outcome = match result {
                Ok(loaded) => settle(self.finish(&obj, loaded).instrument(span.clone()).await),
                Err(e) => settle(Err(e)),
            };
            self.record(&obj, &outcome, started).instrument(span).await;
            by_key.insert(obj.key, outcome);
        }
        // In the batch's order (the sink settles files in its own): the scheduler pairs each
        // outcome with its file for the backoff.
        order
            .iter()
            .map(|key| by_key.remove(key).unwrap_or(FileOutcome::NotStarted))
            .collect()
    }

    /// The load of `objs` panicked: each gets a transient outcome with the panic's message, in
    /// the status, the log and the file's history (its attempt was counted when it started).
    pub async fn panicked(&self, objs: &[ObjectMeta], message: &str) -> Vec<FileOutcome> {
        tracing::error!(error.message = %message, "the load panicked; its files stay in incoming/ for a later attempt");
        let mut outcomes = Vec::with_capacity(objs.len());
        for obj in objs {
            let outcome = FileOutcome::Retry {
                stage: Stage::Load,
                message: format!("the load panicked: {message}"),
            };
            self.record(obj, &outcome, std::time::Instant::now()).await;
            outcomes.push(outcome);
        }
        outcomes
    }

    /// Updates the status and the ledger's attempt count, and logs the outcome once.
    async fn record(&self, obj: &ObjectMeta, outcome: &FileOutcome, started: std::time::Instant) {
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let table = self.routes.resolve(&obj.key).table.ok();
        let table = table.as_deref();
        match &outcome {
            FileOutcome::Loaded { rows } => {
                self.status
                    .file_loaded(&obj.key, table, *rows, obj.size, true, started.elapsed());
                info!(file.rows = rows, file.bytes = obj.size, elapsed_ms, "loaded");
            }
            FileOutcome::AlreadyLoaded => {
                self.status
                    .file_loaded(&obj.key, table, 0, obj.size, false, started.elapsed());
                info!(elapsed_ms, "already loaded earlier; moved");
            }
            FileOutcome::Failed(e) => {
                self.status
                    .file_failed(&obj.key, table, e, e.kind.stage().as_str(), started.elapsed());
                warn!(error.kind = e.kind.as_str(), error.message = %e, "failed; moved to failed/");
            }
            FileOutcome::Busy => info!("held by another loader; skipped"),
            FileOutcome::Retry { stage, message } => {
                self.status.transient_error(stage.as_str());
                warn!(error.stage = %stage, error.message = %message, "transient error; will retry");
                // Best effort: counts towards retry.max_attempts when the database is reachable.
                let file = self.file_ref(obj);
                if let Err(e) = self.db.record_transient(file, *stage, message).await {
                    tracing::debug!(error.message = %e, "could not record the transient error");
                }
            }
            FileOutcome::NotStarted => {}
        }
    }

    fn file_ref<'a>(&'a self, obj: &'a ObjectMeta) -> FileRef<'a> {
        FileRef {
            source: self.source.id(),
            key: &obj.key,
            etag: &obj.etag,
            size: obj.size,
        }
    }

    async fn load_and_move(&self, obj: &ObjectMeta) -> Result<FileOutcome, LoadError> {
        let file = self.file_ref(obj);
        let spec = self.routes.resolve(&obj.key);
        let reader = FileReader::new(&self.source, obj, &spec.format).with_progress(self.status.progress(&obj.key));
        let loaded = self.db.load(file, &spec, &reader).await?;
        self.finish(obj, loaded).await
    }

    /// After the commit: the move (and for a failed file, its report first).
    async fn finish(&self, obj: &ObjectMeta, loaded: LoadOutcome) -> Result<FileOutcome, LoadError> {
        match loaded {
            LoadOutcome::Loaded { rows } => {
                self.move_to(obj, Area::Processed).await?;
                Ok(FileOutcome::Loaded { rows })
            }
            LoadOutcome::AlreadyLoaded { .. } => {
                self.move_to(obj, Area::Processed).await?;
                Ok(FileOutcome::AlreadyLoaded)
            }
            LoadOutcome::Failed(error) | LoadOutcome::AlreadyFailed(error) => {
                // What the report, the status and the log show (the ledger has the full text).
                let error = if self.include_values {
                    error
                } else {
                    error.without_values()
                };
                // The report goes beside the file under the name the file will get, so both are
                // decided first; a name held by another failed version is never reused.
                let name = report::failed_name(&self.source, obj)
                    .await
                    .map_err(|e| e.into_load_error(Stage::Move))?
                    .ok_or_else(|| {
                        let taken = crate::source::alternative_name(obj);
                        LoadError::transient(
                            Stage::Move,
                            format!(
                                "{FAILED}{0} and {FAILED}{taken} (or their reports' names) are taken",
                                obj.key
                            ),
                        )
                    })?;
                self.write_report(obj, &name, &error).await?;
                match self.source.move_to_name(obj, Area::Failed, &name).await {
                    Ok(Some(_)) => Ok(FileOutcome::Failed(error)),
                    Ok(None) => Err(LoadError::transient(
                        Stage::Move,
                        format!("{FAILED}{name} was taken meanwhile"),
                    )),
                    Err(e) => Err(e.into_load_error(Stage::Move)),
                }
            }
            LoadOutcome::Busy => Ok(FileOutcome::Busy),
        }
    }

    async fn move_to(&self, obj: &ObjectMeta, area: Area) -> Result<(), LoadError> {
        match self
            .source
            .move_to(obj, area)
            .await
            .map_err(|e| e.into_load_error(Stage::Move))?
        {
            MoveOutcome::Moved { to } if to != obj.key => {
                warn!(moved.to = %format!("{}{to}", area.prefix()), "the key was taken by another version; moved under a new name");
                Ok(())
            }
            MoveOutcome::Moved { .. } => Ok(()),
            MoveOutcome::SourceGone => {
                info!("the listed version was already gone from incoming/ (moved by another loader or replaced)");
                Ok(())
            }
        }
    }

    /// Written before the move, so a file in `failed/` always has its report beside it.
    async fn write_report(&self, obj: &ObjectMeta, name: &str, error: &FileError) -> Result<(), LoadError> {
        let report = FailureReportFile {
            source: self.source.id(),
            key: format!("{INCOMING}{}", obj.key),
            etag: &obj.etag,
            size: obj.size,
            failed_at: Utc::now(),
            error,
            loader_version: env!("CARGO_PKG_VERSION"),
        };
        let body = serde_json::to_vec_pretty(&report).unwrap_or_default();
        self.source
            .put(&format!("{FAILED}{name}{}", report::SUFFIX), body)
            .await
            .map_err(|e| e.into_load_error(Stage::Report))
    }
}

/// A load's result as an outcome: errors mean "try again later".
fn settle(result: Result<FileOutcome, LoadError>) -> FileOutcome {
    match result {
        Ok(outcome) => outcome,
        Err(LoadError::Transient { stage, message }) => FileOutcome::Retry { stage, message },
        // Only reachable if recording the failure itself was refused: try again later.
        Err(LoadError::Permanent(e)) => FileOutcome::Retry {
            stage: Stage::Database,
            message: e.to_string(),
        },
    }
}
