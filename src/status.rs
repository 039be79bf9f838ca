//! What the loader is doing, for `/status`, `/`, `/metrics` and `/healthz`: the backlog as of the
//! last listing (shrinking as files finish), loads in flight, totals (from [`Metrics`]), the last
//! ticks, the latest failures and an hour of backlog and throughput samples. Written by the
//! scheduler and workers, read by the HTTP handlers.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::FileError;
use crate::metrics::{Exposition, Gauges, Metrics};
use crate::reader::ReadProgress;
use crate::source::ObjectMeta;

/// How many recent failures and ticks are kept.
const RECENT_FAILURES: usize = 20;
const RECENT_TICKS: usize = 10;
/// How much history the status page charts.
const HISTORY: chrono::TimeDelta = chrono::TimeDelta::hours(1);
const MAX_SAMPLES: usize = 720;

pub struct Status {
    pipeline: String,
    started_at: DateTime<Utc>,
    /// Unix milliseconds of the scheduler loop's last sign of life.
    heartbeat_ms: AtomicI64,
    /// Data is "degraded" when the oldest unprocessed file is older than this.
    max_backlog_age: Option<Duration>,
    pub metrics: Metrics,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    backlog: HashMap<String, (u64, DateTime<Utc>)>,
    listed_at: Option<DateTime<Utc>>,
    in_flight: u64,
    ticks: VecDeque<TickReport>,
    recent_failures: VecDeque<FailureReport>,
    samples: VecDeque<Sample>,
    tables: std::collections::BTreeMap<String, TableTotals>,
    /// The loads running now, by key: how far each has read.
    loading: HashMap<String, Arc<Progress>>,
}

/// How far one load in flight has read its object.
#[derive(Debug)]
pub struct Progress {
    pub size: u64,
    pub started_at: DateTime<Utc>,
    /// How far the current attempt has read.
    pub read: ReadProgress,
}

/// A load in flight, as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Loading {
    pub key: String,
    pub size: u64,
    /// Bytes of the object read so far (as stored, so compressed for a compressed file); a
    /// database that reads the object itself (Redshift's COPY) shows 0.
    pub bytes_read: u64,
    /// Data rows read so far and handed on to the database (a database that reads the object
    /// itself shows 0).
    pub rows_read: u64,
    pub started_at: DateTime<Utc>,
    pub seconds: f64,
}

/// One target table's files and rows since the process started.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TableTotals {
    pub files_loaded: u64,
    pub files_already_loaded: u64,
    pub files_failed: u64,
    pub rows_loaded: u64,
    pub bytes_loaded: u64,
    pub last_loaded_at: Option<DateTime<Utc>>,
    pub last_failed_at: Option<DateTime<Utc>>,
}

/// One point of the status page's chart, taken at each listing.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub at: DateTime<Utc>,
    pub backlog_files: u64,
    /// Files loaded (total since start) at that time.
    pub files_loaded: u64,
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
    pub result: TickResult,
}

/// How a tick ended; in `/status` as `"ok"` or the error's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TickResult {
    Ok,
    Failed(String),
}

impl TickResult {
    pub fn is_ok(&self) -> bool {
        matches!(self, TickResult::Ok)
    }

    pub fn as_str(&self) -> &str {
        match self {
            TickResult::Ok => "ok",
            TickResult::Failed(why) => why,
        }
    }
}

impl Serialize for TickResult {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// Whether data is fresh: `degraded` when the oldest unprocessed file is older than
/// `health.max_backlog_age`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Freshness {
    Ok,
    Degraded,
}

impl Freshness {
    pub fn as_str(self) -> &'static str {
        match self {
            Freshness::Ok => "ok",
            Freshness::Degraded => "degraded",
        }
    }
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
    /// `ok`, or `degraded` when the oldest unprocessed file is older than
    /// `health.max_backlog_age`.
    pub freshness: Freshness,
    pub in_flight: u64,
    /// The files being loaded now, the longest-running first.
    pub loading: Vec<Loading>,
    pub totals: Totals,
    pub last_tick: Option<TickReport>,
    pub recent_ticks: Vec<TickReport>,
    pub recent_failures: Vec<FailureReport>,
    /// Per target table (files that failed without one are not here).
    pub tables: std::collections::BTreeMap<String, TableTotals>,
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
    pub fn new(pipeline: &str, max_backlog_age: Option<Duration>) -> Status {
        Status {
            pipeline: pipeline.to_string(),
            started_at: Utc::now(),
            heartbeat_ms: AtomicI64::new(Utc::now().timestamp_millis()),
            max_backlog_age,
            metrics: Metrics::new(),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves plain data: still usable.
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

    pub fn record_listing(&self, listing: &[ObjectMeta], list_calls: u64, took: Duration) {
        self.metrics.observe_list(took, list_calls);
        let now = Utc::now();
        let loaded = self.metrics.files_loaded.get();
        let mut inner = self.inner();
        inner.backlog = listing
            .iter()
            .map(|o| (o.key.clone(), (o.size, o.last_modified)))
            .collect();
        inner.listed_at = Some(now);
        let sample = Sample {
            at: now,
            backlog_files: listing.len() as u64,
            files_loaded: loaded,
        };
        inner.samples.push_back(sample);
        while inner.samples.len() > MAX_SAMPLES || inner.samples.front().is_some_and(|s| now - s.at > HISTORY) {
            inner.samples.pop_front();
        }
    }

    pub fn record_tick(&self, tick: TickReport) {
        self.metrics.tick(tick.result.is_ok());
        let mut inner = self.inner();
        if inner.ticks.len() == RECENT_TICKS {
            inner.ticks.pop_back();
        }
        inner.ticks.push_front(tick);
    }

    /// A load of `files` starts: counted in flight, each file's progress followed.
    pub fn load_started(&self, files: &[ObjectMeta]) {
        let mut inner = self.inner();
        inner.in_flight += 1;
        for f in files {
            let progress = Progress {
                size: f.size,
                started_at: Utc::now(),
                read: ReadProgress::default(),
            };
            inner.loading.insert(f.key.clone(), Arc::new(progress));
        }
    }

    pub fn load_ended(&self, files: &[ObjectMeta]) {
        let mut inner = self.inner();
        inner.in_flight = inner.in_flight.saturating_sub(1);
        for f in files {
            inner.loading.remove(&f.key);
        }
    }

    /// The counters of the load of `key` in flight, for its reader to advance.
    pub fn progress(&self, key: &str) -> Option<ReadProgress> {
        self.inner().loading.get(key).map(|p| p.read.clone())
    }

    /// The file left `incoming/`: loaded now (`now`) or committed earlier.
    pub fn file_loaded(&self, key: &str, table: Option<&str>, rows: u64, bytes: u64, now: bool, took: Duration) {
        let m = &self.metrics;
        if now {
            m.files_loaded.inc();
            m.rows_loaded.inc_by(rows);
            m.bytes_loaded.inc_by(bytes);
        } else {
            m.files_already_loaded.inc();
        }
        m.observe_load(took);
        let outcome = if now { "loaded" } else { "already_loaded" };
        m.table_file(table.unwrap_or_default(), outcome, rows, took);
        let mut inner = self.inner();
        inner.backlog.remove(key);
        if let Some(table) = table {
            let t = inner.tables.entry(table.to_string()).or_default();
            if now {
                t.files_loaded += 1;
                t.rows_loaded += rows;
                t.bytes_loaded += bytes;
                t.last_loaded_at = Some(Utc::now());
            } else {
                t.files_already_loaded += 1;
            }
        }
    }

    pub fn file_failed(&self, key: &str, table: Option<&str>, error: &FileError, stage: &'static str, took: Duration) {
        self.metrics.files_failed.inc();
        self.metrics.error(error.kind.as_str(), stage);
        self.metrics.observe_load(took);
        self.metrics.table_file(table.unwrap_or_default(), "failed", 0, took);
        let mut inner = self.inner();
        inner.backlog.remove(key);
        if let Some(table) = table {
            let t = inner.tables.entry(table.to_string()).or_default();
            t.files_failed += 1;
            t.last_failed_at = Some(Utc::now());
        }
        if inner.recent_failures.len() == RECENT_FAILURES {
            inner.recent_failures.pop_back();
        }
        inner.recent_failures.push_front(FailureReport {
            key: key.to_string(),
            at: Utc::now(),
            error: error.clone(),
        });
    }

    pub fn transient_error(&self, stage: &'static str) {
        self.metrics.retries.inc();
        self.metrics.error("transient", stage);
    }

    /// The chart's samples, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.inner().samples.iter().cloned().collect()
    }

    pub fn snapshot(&self) -> StatusSnapshot {
        let m = &self.metrics;
        let inner = self.inner();
        let now = Utc::now();
        let oldest = inner.backlog.values().map(|(_, t)| *t).min();
        let oldest_age_seconds = oldest.map(|t| ((now - t).num_milliseconds().max(0) as f64) / 1000.0);
        let degraded = match (self.max_backlog_age, oldest_age_seconds) {
            (Some(max), Some(age)) => age > max.as_secs_f64(),
            _ => false,
        };
        StatusSnapshot {
            pipeline: self.pipeline.clone(),
            version: env!("CARGO_PKG_VERSION"),
            started_at: self.started_at,
            backlog: Backlog {
                files: inner.backlog.len() as u64,
                bytes: inner.backlog.values().map(|(s, _)| s).sum(),
                oldest_age_seconds,
                listed_at: inner.listed_at,
            },
            freshness: if degraded { Freshness::Degraded } else { Freshness::Ok },
            in_flight: inner.in_flight,
            loading: {
                let mut loading: Vec<Loading> = inner
                    .loading
                    .iter()
                    .map(|(key, p)| Loading {
                        key: key.clone(),
                        size: p.size,
                        bytes_read: p.read.bytes.load(Ordering::Relaxed),
                        rows_read: p.read.rows.load(Ordering::Relaxed),
                        started_at: p.started_at,
                        seconds: ((now - p.started_at).num_milliseconds().max(0) as f64) / 1000.0,
                    })
                    .collect();
                loading.sort_by(|a, b| a.started_at.cmp(&b.started_at).then_with(|| a.key.cmp(&b.key)));
                loading
            },
            totals: Totals {
                files_loaded: m.files_loaded.get(),
                rows_loaded: m.rows_loaded.get(),
                bytes_loaded: m.bytes_loaded.get(),
                files_failed: m.files_failed.get(),
                files_already_loaded: m.files_already_loaded.get(),
                transient_errors: m.retries.get(),
                ticks: m.ticks(),
                list_calls: m.list_calls.get(),
            },
            last_tick: inner.ticks.front().cloned(),
            recent_ticks: inner.ticks.iter().cloned().collect(),
            tables: inner.tables.clone(),
            recent_failures: inner.recent_failures.iter().cloned().collect(),
        }
    }

    /// `/metrics`: the counters and histograms, and the gauges as of now.
    pub fn prometheus(&self, format: Exposition) -> String {
        let s = self.snapshot();
        self.metrics.render(
            &Gauges {
                backlog_files: s.backlog.files,
                backlog_bytes: s.backlog.bytes,
                oldest_age_seconds: s.backlog.oldest_age_seconds.unwrap_or(0.0),
                in_flight: s.in_flight,
                degraded: s.freshness == Freshness::Degraded,
            },
            format,
        )
    }
}
