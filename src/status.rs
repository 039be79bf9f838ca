//! What the loader is doing, for `/status`, `/metrics` and `/healthz`: the backlog as of the last
//! listing (shrinking as files finish), loads in flight, totals, the last tick and the latest
//! failures. Written by the scheduler and workers, read by the HTTP handlers.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::FileError;
use crate::source::ObjectMeta;

/// How many recent failures `/status` keeps.
const RECENT_FAILURES: usize = 20;

pub struct Status {
    pipeline: String,
    started_at: DateTime<Utc>,
    /// Unix milliseconds of the scheduler loop's last sign of life.
    heartbeat_ms: AtomicI64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    backlog: HashMap<String, (u64, DateTime<Utc>)>,
    listed_at: Option<DateTime<Utc>>,
    in_flight: u64,
    totals: Totals,
    last_tick: Option<TickReport>,
    recent_failures: VecDeque<FailureReport>,
}

/// Counters since the process started.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub files_loaded: u64,
    pub rows_loaded: u64,
    pub bytes_loaded: u64,
    pub files_failed: u64,
    /// Files found already committed (a crash or another replica between commit and move).
    pub files_already_loaded: u64,
    /// Load attempts that hit a transient error and were left for a later tick.
    pub transient_errors: u64,
    pub ticks: u64,
    pub list_calls: u64,
}

/// One tick of the scheduler.
#[derive(Debug, Clone, Serialize)]
pub struct TickReport {
    pub started_at: DateTime<Utc>,
    pub duration_ms: u64,
    /// Files found in `incoming/`.
    pub listed: u64,
    /// Files handed to the workers.
    pub dispatched: u64,
    /// `ok`, or what went wrong.
    pub result: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct FailureReport {
    pub key: String,
    pub at: DateTime<Utc>,
    pub error: FileError,
}

/// `GET /status`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusSnapshot {
    pub pipeline: String,
    pub version: &'static str,
    pub started_at: DateTime<Utc>,
    pub backlog: Backlog,
    pub in_flight: u64,
    pub totals: Totals,
    pub last_tick: Option<TickReport>,
    pub recent_failures: Vec<FailureReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Backlog {
    /// Files in `incoming/` at the last listing that have not finished since.
    pub files: u64,
    pub bytes: u64,
    /// Age of the oldest of them, in seconds; `null` when there is none.
    pub oldest_age_seconds: Option<f64>,
    pub listed_at: Option<DateTime<Utc>>,
}

impl Status {
    pub fn new(pipeline: &str) -> Status {
        Status {
            pipeline: pipeline.to_string(),
            started_at: Utc::now(),
            heartbeat_ms: AtomicI64::new(Utc::now().timestamp_millis()),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves plain counters: still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn heartbeat(&self) {
        self.heartbeat_ms
            .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    pub fn since_heartbeat(&self) -> Duration {
        let ms = Utc::now().timestamp_millis() - self.heartbeat_ms.load(Ordering::Relaxed);
        Duration::from_millis(ms.max(0) as u64)
    }

    pub fn record_listing(&self, listing: &[ObjectMeta], list_calls: u64) {
        let mut inner = self.inner();
        inner.backlog = listing
            .iter()
            .map(|o| (o.key.clone(), (o.size, o.last_modified)))
            .collect();
        inner.listed_at = Some(Utc::now());
        inner.totals.list_calls += list_calls;
    }

    pub fn record_tick(&self, tick: TickReport) {
        let mut inner = self.inner();
        inner.totals.ticks += 1;
        inner.last_tick = Some(tick);
    }

    pub fn load_started(&self) {
        self.inner().in_flight += 1;
    }

    pub fn load_ended(&self) {
        let mut inner = self.inner();
        inner.in_flight = inner.in_flight.saturating_sub(1);
    }

    /// The file left `incoming/`: loaded now or earlier.
    pub fn file_loaded(&self, key: &str, rows: u64, bytes: u64, now: bool) {
        let mut inner = self.inner();
        inner.backlog.remove(key);
        if now {
            inner.totals.files_loaded += 1;
            inner.totals.rows_loaded += rows;
            inner.totals.bytes_loaded += bytes;
        } else {
            inner.totals.files_already_loaded += 1;
        }
    }

    pub fn file_failed(&self, key: &str, error: &FileError) {
        let mut inner = self.inner();
        inner.backlog.remove(key);
        inner.totals.files_failed += 1;
        if inner.recent_failures.len() == RECENT_FAILURES {
            inner.recent_failures.pop_back();
        }
        inner.recent_failures.push_front(FailureReport {
            key: key.to_string(),
            at: Utc::now(),
            error: error.clone(),
        });
    }

    pub fn transient_error(&self) {
        self.inner().totals.transient_errors += 1;
    }

    pub fn snapshot(&self) -> StatusSnapshot {
        let inner = self.inner();
        let now = Utc::now();
        let oldest = inner.backlog.values().map(|(_, t)| *t).min();
        StatusSnapshot {
            pipeline: self.pipeline.clone(),
            version: env!("CARGO_PKG_VERSION"),
            started_at: self.started_at,
            backlog: Backlog {
                files: inner.backlog.len() as u64,
                bytes: inner.backlog.values().map(|(s, _)| s).sum(),
                oldest_age_seconds: oldest.map(|t| ((now - t).num_milliseconds().max(0) as f64) / 1000.0),
                listed_at: inner.listed_at,
            },
            in_flight: inner.in_flight,
            totals: inner.totals.clone(),
            last_tick: inner.last_tick.clone(),
            recent_failures: inner.recent_failures.iter().cloned().collect(),
        }
    }

    /// Prometheus text exposition of the snapshot.
    pub fn prometheus(&self) -> String {
        let s = self.snapshot();
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
        };
        metric(
            "s3_sql_loader_files_loaded_total",
            "counter",
            "Files loaded and committed.",
            s.totals.files_loaded.to_string(),
        );
        metric(
            "s3_sql_loader_rows_loaded_total",
            "counter",
            "Rows committed.",
            s.totals.rows_loaded.to_string(),
        );
        metric(
            "s3_sql_loader_bytes_loaded_total",
            "counter",
            "Bytes of the files loaded (as stored).",
            s.totals.bytes_loaded.to_string(),
        );
        metric(
            "s3_sql_loader_files_failed_total",
            "counter",
            "Files moved to failed/.",
            s.totals.files_failed.to_string(),
        );
        metric(
            "s3_sql_loader_files_already_loaded_total",
            "counter",
            "Files found committed earlier and only moved.",
            s.totals.files_already_loaded.to_string(),
        );
        metric(
            "s3_sql_loader_transient_errors_total",
            "counter",
            "Load attempts left for a later tick after a transient error.",
            s.totals.transient_errors.to_string(),
        );
        metric(
            "s3_sql_loader_ticks_total",
            "counter",
            "Scheduler ticks.",
            s.totals.ticks.to_string(),
        );
        metric(
            "s3_sql_loader_list_calls_total",
            "counter",
            "List calls made to the store.",
            s.totals.list_calls.to_string(),
        );
        metric(
            "s3_sql_loader_backlog_files",
            "gauge",
            "Files in incoming/ not yet processed.",
            s.backlog.files.to_string(),
        );
        metric(
            "s3_sql_loader_backlog_bytes",
            "gauge",
            "Bytes in incoming/ not yet processed.",
            s.backlog.bytes.to_string(),
        );
        metric(
            "s3_sql_loader_backlog_oldest_age_seconds",
            "gauge",
            "Age of the oldest unprocessed file.",
            s.backlog.oldest_age_seconds.unwrap_or(0.0).to_string(),
        );
        metric(
            "s3_sql_loader_loads_in_flight",
            "gauge",
            "Loads running now.",
            s.in_flight.to_string(),
        );
        out
    }
}
