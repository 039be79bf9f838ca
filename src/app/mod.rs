//! Wiring: builds the source, database, status, worker and scheduler from a [`Config`], and runs
//! them as the daemon ([`App::run_until_stopped`]) or for one tick ([`App::run_once`]). Also the
//! small commands: `check`, `retry-failed`, and (in [`operator`]) `status`, `ledger` and
//! `reload`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

mod operator;

pub use self::operator::{
    Backlog, Failure, FileHistory, Plan, Planned, Stored, relative_key, render_entries, render_history,
};

use crate::cloudwatch::Publisher;
use crate::config::Config;
use crate::http::{self, AppState};
use crate::routes::Routes;
use crate::scheduler::Scheduler;
use crate::sink::Database;
use crate::source::{FAILED, Source};
use crate::status::Status;
use crate::worker::{FileOutcome, Worker};

pub struct App {
    config: Config,
    source: Arc<Source>,
    db: Arc<Database>,
    status: Arc<Status>,
    publisher: Option<Arc<Publisher>>,
    listener: Option<TcpListener>,
}

/// What one `once` tick did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OnceSummary {
    pub listed: u64,
    pub loaded: u64,
    pub rows: u64,
    pub already_loaded: u64,
    pub failed: u64,
    pub retry: u64,
    pub busy: u64,
    /// Left for a later tick: changed within `source.settle_time`.
    pub settling: u64,
}

impl App {
    /// Sets everything up without needing the database to be up (it is reached lazily).
    /// `listener`: where to serve HTTP, bound by the caller (port 0 in tests); `None` for the
    /// commands that serve nothing.
    pub async fn build(config: Config, listener: Option<TcpListener>) -> anyhow::Result<App> {
        Self::build_with(config, listener, true).await
    }

    /// For `check`: a local source folder that does not exist is an error, not created.
    pub async fn build_to_check(config: Config) -> anyhow::Result<App> {
        Self::build_with(config, None, false).await
    }

    async fn build_with(config: Config, listener: Option<TcpListener>, create: bool) -> anyhow::Result<App> {
        let source = Arc::new(Source::connect(&config.source, create).await?);
        let db = Arc::new(Database::connect_lazy(&config)?);
        let max_age = config.health.max_backlog_age;
        let status = Arc::new(Status::new(&config.pipeline, (!max_age.is_zero()).then_some(max_age)));
        let publisher = if config.cloudwatch.enabled {
            Some(Arc::new(Publisher::new(&config, status.clone()).await))
        } else {
            None
        };
        Ok(App {
            status,
            publisher,
            config,
            source,
            db,
            listener,
        })
    }

    /// Binds `http.listen` when `http.enabled` (for [`App::build`]).
    pub async fn listen(config: &Config) -> anyhow::Result<Option<TcpListener>> {
        if !config.http.enabled {
            return Ok(None);
        }
        let addr = config.listen_addr();
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("http.listen: cannot listen on {addr}"))?;
        Ok(Some(listener))
    }

    /// The HTTP port actually bound (useful with port 0).
    pub fn http_port(&self) -> Option<u16> {
        self.listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.port())
    }

    fn worker(&self) -> Arc<Worker> {
        Arc::new(Worker {
            source: self.source.clone(),
            db: self.db.clone(),
            status: self.status.clone(),
            routes: Routes::new(&self.config),
            include_values: self.config.reports.include_values,
        })
    }

    /// The daemon: ticks until `stop` is cancelled, then drains within `shutdown.grace`.
    pub async fn run_until_stopped(self, stop: CancellationToken) -> anyhow::Result<()> {
        let scheduler = Scheduler::new(&self.config, self.worker(), stop.clone(), self.publisher.clone());
        let http_stop = CancellationToken::new();
        let server = match self.listener {
            Some(listener) => {
                info!(http.listen = %listener.local_addr()?, "serving /healthz /readyz /status /metrics");
                let readiness = Arc::new(http::Readiness::default());
                {
                    let (readiness, source, db) = (readiness.clone(), self.source.clone(), self.db.clone());
                    let stop = http_stop.clone();
                    tokio::spawn(async move { readiness.run(&source, &db, stop).await });
                }
                let state = AppState {
                    status: self.status.clone(),
                    readiness,
                    liveness_window: self.config.schedule.interval * 3 + Duration::from_secs(60),
                    secrets: Arc::new(vec![self.config.database.url.expose_secret().to_string()]),
                    fail_readiness_when_degraded: self.config.health.fail_readiness_when_degraded,
                };
                let shutdown = http_stop.clone();
                Some(tokio::spawn(async move {
                    axum::serve(listener, http::router(state))
                        .with_graceful_shutdown(async move { shutdown.cancelled().await })
                        .await
                }))
            }
            None => None,
        };
        info!(
            pipeline = %self.config.pipeline,
            source = %self.source.id(),
            database = %crate::redact::url(self.config.database.url.expose_secret()),
            interval_s = self.config.schedule.interval.as_secs_f64(),
            concurrency = self.config.workers.concurrency,
            "loader started"
        );
        let abandoned = scheduler.run(self.config.shutdown.grace).await;
        // HTTP stays up while loads drain, so probes keep answering during a rollout.
        http_stop.cancel();
        if let Some(server) = server {
            server.await??;
        }
        // Closing waits for connections to come back; abandoned loads still hold theirs, and
        // the process exit rolls them back anyway.
        if abandoned == 0 {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.db.close()).await;
        }
        info!(abandoned, "loader stopped");
        Ok(())
    }

    /// One tick, waiting for every load it started.
    pub async fn run_once(self) -> anyhow::Result<OnceSummary> {
        let stop = CancellationToken::new();
        let scheduler = Scheduler::new(&self.config, self.worker(), stop, None).leaving_failed_ticks_to_the_caller();
        let handles = scheduler.tick().await;
        let snapshot = self.status.snapshot();
        if let Some(tick) = snapshot.last_tick.as_ref().filter(|t| !t.result.is_ok()) {
            anyhow::bail!("{}", tick.result.as_str());
        }
        let mut summary = OnceSummary {
            listed: snapshot.last_tick.map(|t| t.listed).unwrap_or(0),
            ..OnceSummary::default()
        };
        for handle in handles {
            for outcome in handle.await.context("a load task panicked")? {
                match outcome {
                    FileOutcome::Loaded { rows } => {
                        summary.loaded += 1;
                        summary.rows += rows;
                    }
                    FileOutcome::AlreadyLoaded => summary.already_loaded += 1,
                    FileOutcome::Failed(_) => summary.failed += 1,
                    FileOutcome::Retry { .. } | FileOutcome::NotStarted => summary.retry += 1,
                    FileOutcome::Busy => summary.busy += 1,
                }
            }
        }
        if let Some(publisher) = &self.publisher {
            // After the loads, so the figures include them; the call has its own timeout.
            let _ = publisher.publish().await;
        }
        summary.settling = self.source.settling().await.unwrap_or(0);
        self.db.close().await;
        Ok(summary)
    }

    /// `check`: whether the store and the database answer, and how the store keeps names in
    /// `processed/` and `failed/`. One line per check: `Ok` with a note (possibly empty).
    pub async fn check(&self) -> Vec<(String, Result<String, String>)> {
        let store = self
            .source
            .check()
            .await
            .map(|()| String::new())
            .map_err(|e| e.to_string());
        let copies = match &store {
            Ok(_) => self.source.copy_guard_note().await.map_err(|e| e.to_string()),
            Err(_) => Err("not probed: the store is unreachable".into()),
        };
        let url = self.config.database.url.expose_secret();
        let db = match self.db.ping().await {
            Ok(()) => self.db.ensure_ledger().await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        }
        .map(|()| String::new())
        .map_err(|e| crate::redact::scrub(&e, &[url]));
        vec![
            (format!("store {}", self.source.id()), store),
            ("store never replaces processed/ and failed/ names".into(), copies),
            (format!("database {}", crate::redact::url(url)), db),
        ]
    }

    /// `retry-failed`: moves files (optionally only under `prefix`) from `failed/` back to
    /// `incoming/` and lets the ledger load them again. Returns how many were moved.
    /// The key relative to `incoming/` that a file in failed/ came from: its report's `key`,
    /// else its own name.
    async fn original_key(&self, obj: &crate::source::ObjectMeta) -> String {
        let report = crate::report::read(&self.source, &obj.key).await.ok().flatten();
        report
            .as_ref()
            .and_then(|r| r.original_key())
            .map_or_else(|| obj.key.clone(), str::to_string)
    }

    pub async fn retry_failed(&self, prefix: Option<&str>) -> anyhow::Result<u64> {
        // `failed/orders/` and `orders/` name the same files.
        let prefix = prefix.map(|p| p.strip_prefix(FAILED).unwrap_or(p));
        self.db.ensure_ledger().await?;
        let mut moved = 0;
        let listed = self.source.list_failed_versions().await?;
        for obj in crate::report::failed_files(&self.source, listed).await? {
            if !prefix.is_none_or(|p| obj.key.starts_with(p)) {
                continue;
            }
            // The key it came from, as its report says: a file stored as `K.<tag>` (its key in
            // failed/ was taken by another version) goes back as `K`, so its format is known.
            let original = self.original_key(&obj).await;
            // Ledger first: a file back in incoming/ must not be taken for an already-failed one.
            let failed = crate::sink::entries::Reopen::Failed;
            self.db.reopen(self.source.id(), &original, &obj.etag, failed).await?;
            let outcome = if original == obj.key {
                Some(self.source.move_back(&obj).await?)
            } else {
                self.source.move_back_as(&obj, &original).await?
            };
            match outcome {
                Some(crate::source::MoveOutcome::Moved { .. }) => {
                    // Its report, if one of the loader's is there (never another object).
                    if crate::report::read(&self.source, &obj.key).await?.is_some() {
                        let report = format!("{FAILED}{}{}", obj.key, crate::report::SUFFIX);
                        self.source.delete(&report).await?;
                    }
                    moved += 1;
                    info!(key = %original, "moved back to incoming/");
                }
                Some(_) => {}
                None => tracing::warn!(
                    key = %obj.key,
                    "not moved back: incoming/{original} holds another version; retry once it is loaded"
                ),
            }
        }
        Ok(moved)
    }
}

/// What `validate` found.
#[derive(Debug)]
pub struct Validation {
    pub key: String,
    pub spec: crate::routes::LoadSpec,
    /// What the database said of the target table.
    pub table: TableSeen,
    /// The columns a load would create or add.
    pub columns: Vec<(String, crate::schema::ColumnType)>,
    pub rows: u64,
    pub error: Option<crate::error::FileError>,
}

/// What `validate` knows of the table a load would write to.
#[derive(Debug, Clone, PartialEq)]
pub enum TableSeen {
    /// Not asked (`--offline`, or the key names no table).
    NotAsked,
    /// It does not exist yet: the load would create it.
    New,
    /// It exists with these columns (name and type, in the loader's words), and the file is
    /// checked against them, as a load would check it.
    Exists(Vec<(String, String)>),
    /// The database could not be asked (why): the file is checked as for a new table.
    Unreachable(String),
}

/// `validate FILE`: decodes a local file with the settings of the route its `key` (relative to
/// `incoming/`) would get, and checks its names and every value against the table a load would
/// meet: the existing table's columns, types and declared limits when the database has it (not
/// asked when `offline`), else the types a new table would get (widened as a load would widen
/// them). Writes nothing, and creates no database.
pub async fn validate_file(
    config: &Config,
    path: &std::path::Path,
    key: &str,
    offline: bool,
) -> anyhow::Result<Validation> {
    let mut spec = Routes::new(config).resolve(key);
    let (table, existing) = match &spec.table {
        Ok(table) if !offline => existing_table(config, table).await,
        _ => (TableSeen::NotAsked, None),
    };
    loop {
        let mut validation = Validation {
            key: key.to_string(),
            spec: spec.clone(),
            table: table.clone(),
            columns: Vec::new(),
            rows: 0,
            error: None,
        };
        if let Err(e) = &spec.table {
            validation.error = Some(e.clone());
            return Ok(validation);
        }
        let file = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        validation.error = read_all_values(file, key, &spec, existing.clone(), &mut validation)
            .await
            .err();
        let failed = validation.error.clone().map(crate::error::LoadError::Permanent);
        let new_columns = validation.columns.clone();
        match failed.and_then(|e| crate::sink::widened_spec(&e, &new_columns, &spec)) {
            Some(wider) => spec = wider,
            None => return Ok(validation),
        }
    }
}

/// Asks the database for `table`'s columns, without creating anything: a SQLite file that does
/// not exist holds no table, and a server that does not answer within a few seconds is
/// reported, not waited for.
async fn existing_table(config: &Config, table: &str) -> (TableSeen, Option<crate::sink::TableShape>) {
    use std::str::FromStr;
    let url = config.database.url.expose_secret();
    let unreachable = |why: String| {
        let why = crate::redact::scrub(&why, &[url]);
        (TableSeen::Unreachable(why), None)
    };
    if config.dialect() == Ok(crate::config::Dialect::Sqlite) {
        match sqlx::sqlite::SqliteConnectOptions::from_str(url) {
            Ok(o) if o.get_filename().exists() => {}
            Ok(_) => return (TableSeen::New, None),
            Err(e) => return unreachable(e.to_string()),
        }
    }
    let db = match Database::connect_lazy(config) {
        Ok(db) => db,
        Err(e) => return unreachable(e.to_string()),
    };
    if let Some(Err(why)) = db.probe().await {
        return unreachable(why);
    }
    let ask = async {
        db.ping().await?;
        db.table_shape(table).await.map_err(|e| e.to_string())
    };
    let asked = tokio::time::timeout(Duration::from_secs(10), ask).await;
    db.close().await;
    match asked {
        Ok(Ok(Some(shape))) => {
            let columns = shape.0.iter().map(|(c, t)| (c.clone(), t.name().to_string())).collect();
            (TableSeen::Exists(columns), Some(shape))
        }
        Ok(Ok(None)) => (TableSeen::New, None),
        Ok(Err(why)) => unreachable(why),
        Err(_) => unreachable("no database session within 10s".into()),
    }
}

/// One reading of the file for [`validate_file`]: columns and rows into `validation`.
async fn read_all_values(
    file: tokio::fs::File,
    key: &str,
    spec: &crate::routes::LoadSpec,
    existing: Option<crate::sink::TableShape>,
    validation: &mut Validation,
) -> Result<(), crate::error::FileError> {
    use crate::error::FileErrorKind;
    let as_file_error = crate::format::DecodeFailure::into_file_error;
    let mut decoded = crate::format::decode(Box::new(file), key, None, spec.format.clone())
        .await
        .map_err(as_file_error)?;
    if decoded.header.is_empty() {
        return Ok(());
    }
    let names = crate::sink::file_columns(&decoded.header)?;
    let first = decoded.next_batch().await.map_err(as_file_error)?;
    let (columns, limits) = existing.map_or((None, Default::default()), |(c, l)| (Some(c), l));
    let table = spec.table.as_deref().unwrap_or("(new)");
    let plan = crate::sink::plan_load(table, &names, &decoded.types, columns, spec, first.as_ref())?;
    validation.columns = plan.new_columns();
    let checks = plan.checks(&limits);
    let mut batch = first;
    while let Some(b) = batch {
        for r in 0..b.len() {
            for ((value, check), column) in b.row(r).zip(&checks).zip(&plan.columns) {
                check
                    .ty
                    .convert(value)
                    .and_then(|_| value.map_or(Ok(()), |v| check.limits.check(v)))
                    .map_err(|m| b.error_at(r, column, FileErrorKind::Type, m))?;
            }
            validation.rows += 1;
        }
        batch = decoded.next_batch().await.map_err(as_file_error)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole daemon in-process, on a listener the test bound to port 0: it serves, loads
    /// and stops when told.
    #[tokio::test]
    async fn the_daemon_runs_in_process_on_a_listener_it_is_given() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("incoming/t")).unwrap();
        std::fs::write(root.join("incoming/t/a.csv"), "id\n1\n").unwrap();
        let mut config = Config::default();
        config.source.url = format!("file://{}", root.display());
        config.source.settle_time = Duration::ZERO;
        config.schedule.interval = Duration::from_millis(100);
        config.database.url = format!("sqlite://{}/loader.db", root.display()).into();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = App::build(config, Some(listener)).await.unwrap();
        let port = app.http_port().unwrap();
        let stop = CancellationToken::new();
        let daemon = tokio::spawn(app.run_until_stopped(stop.clone()));
        let base = format!("http://127.0.0.1:{port}");
        let mut loaded = false;
        for _ in 0..100 {
            let status: serde_json::Value = match reqwest::get(format!("{base}/status")).await {
                Ok(r) => r.json().await.unwrap(),
                Err(_) => serde_json::Value::Null,
            };
            if status["totals"]["files_loaded"] == 1 {
                loaded = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(loaded, "the file was loaded and /status said so");
        assert!(root.join("processed/t/a.csv").exists());
        assert_eq!(reqwest::get(format!("{base}/healthz")).await.unwrap().status(), 200);
        stop.cancel();
        daemon.await.unwrap().unwrap();
    }
}
