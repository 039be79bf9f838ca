//! Every metric the loader exports, declared once: counters and histograms updated by the
//! scheduler and workers, rendered as Prometheus text by [`Metrics::render`] (with the gauges
//! that [`crate::status`] knows), and drained per tick by [`crate::cloudwatch`].
//!
//! Names follow Prometheus conventions: `s3_sql_loader_` prefix, base units (seconds, bytes),
//! `_total` on counters.

//! Every metric the loader exports, declared once in a `prometheus-client` registry: counters
//! and histograms updated by the scheduler and workers, gauges set from [`crate::status`] when
//! rendered, and the load durations drained per tick by [`crate::cloudwatch`].
//!
//! Names follow Prometheus conventions: `s3_sql_loader_` prefix, base units (seconds, bytes),
//! `_total` on counters. [`Metrics::render`] speaks the Prometheus text format (0.0.4) or
//! OpenMetrics 1.0, whichever the scraper asks for.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::{prometheus_text, text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// Bucket bounds (seconds) for per-file load durations.
const LOAD_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Bucket bounds (seconds) for listings of `incoming/`.
const LIST_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

type Labels<const N: usize> = [(&'static str, &'static str); N];
/// A table's name, and for files the outcome.
type TableLabels = Vec<(&'static str, String)>;

pub struct Metrics {
    /// Files whose rows were committed.
    pub files_loaded: Counter,
    /// Files found committed earlier and only moved.
    pub files_already_loaded: Counter,
    /// Files moved to failed/.
    pub files_failed: Counter,
    /// Rows committed.
    pub rows_loaded: Counter,
    /// Bytes (as stored) of the files loaded.
    pub bytes_loaded: Counter,
    /// Load attempts that ended in a transient error (the file is retried).
    pub retries: Counter,
    /// List calls made to the store.
    pub list_calls: Counter,
    /// PutMetricData calls that succeeded / failed or timed out.
    pub cloudwatch_published: Counter,
    pub cloudwatch_failed: Counter,
    /// Scheduler ticks by result (`ok`: listed and dispatched; `error`: listing or database
    /// unreachable).
    ticks: Family<Labels<1>, Counter>,
    /// Errors by (kind, stage).
    errors: Family<Labels<2>, Counter>,
    load_duration: Histogram,
    list_duration: Histogram,
    /// Per target table: files by outcome, rows, load durations.
    table_files: Family<TableLabels, Counter>,
    table_rows: Family<TableLabels, Counter>,
    table_load_duration: Family<TableLabels, Histogram, fn() -> Histogram>,
    backlog_files: Gauge,
    backlog_bytes: Gauge,
    oldest_age_seconds: Gauge<f64, AtomicU64>,
    in_flight: Gauge,
    degraded: Gauge,
    registry: Registry,
    /// Load durations since CloudWatch last took them.
    window: Mutex<DurationWindow>,
}

/// Count, sum, minimum and maximum of durations, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DurationWindow {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

/// Gauges known only to the status at render time.
pub struct Gauges {
    pub backlog_files: u64,
    pub backlog_bytes: u64,
    pub oldest_age_seconds: f64,
    pub in_flight: u64,
    /// 1 when data freshness is degraded (the oldest file is older than health.max_backlog_age).
    pub degraded: bool,
}

/// The exposition format a scraper asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposition {
    /// Prometheus text format 0.0.4 (what `curl` and most scrapers get).
    Prometheus,
    /// OpenMetrics 1.0 text, for an `Accept` header that names `application/openmetrics-text`.
    OpenMetrics,
}

impl Exposition {
    pub fn from_accept(accept: Option<&str>) -> Exposition {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Exposition::OpenMetrics,
            _ => Exposition::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Exposition::Prometheus => prometheus_text::CONTENT_TYPE,
            Exposition::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Metrics {
    pub fn new() -> Metrics {
        let m = Metrics {
            files_loaded: Counter::default(),
            files_already_loaded: Counter::default(),
            files_failed: Counter::default(),
            rows_loaded: Counter::default(),
            bytes_loaded: Counter::default(),
            retries: Counter::default(),
            list_calls: Counter::default(),
            cloudwatch_published: Counter::default(),
            cloudwatch_failed: Counter::default(),
            ticks: Family::default(),
            errors: Family::default(),
            load_duration: Histogram::new(LOAD_BUCKETS.iter().copied()),
            list_duration: Histogram::new(LIST_BUCKETS.iter().copied()),
            table_files: Family::default(),
            table_rows: Family::default(),
            table_load_duration: Family::new_with_constructor(|| Histogram::new(LOAD_BUCKETS.iter().copied())),
            backlog_files: Gauge::default(),
            backlog_bytes: Gauge::default(),
            oldest_age_seconds: Gauge::default(),
            in_flight: Gauge::default(),
            degraded: Gauge::default(),
            registry: Registry::with_prefix("s3_sql_loader"),
            window: Mutex::new(DurationWindow::default()),
        };
        m.register()
    }

    /// Declares every metric with its help text (the registry holds handles that share the
    /// fields' values).
    fn register(mut self) -> Metrics {
        let r = &mut self.registry;
        let counters = [
            ("files_loaded", "Files whose rows were committed", &self.files_loaded),
            (
                "files_already_loaded",
                "Files found committed earlier (after a crash or by a replica) and only moved",
                &self.files_already_loaded,
            ),
            (
                "files_failed",
                "Files moved to failed/ with a report",
                &self.files_failed,
            ),
            ("rows_loaded", "Rows committed", &self.rows_loaded),
            (
                "bytes_loaded",
                "Bytes, as stored, of the files loaded",
                &self.bytes_loaded,
            ),
            (
                "retries",
                "Load attempts that ended in a transient error; the file is retried later",
                &self.retries,
            ),
            ("list_calls", "List calls made to the store", &self.list_calls),
            (
                "cloudwatch_publish_failures",
                "CloudWatch PutMetricData calls that failed or timed out",
                &self.cloudwatch_failed,
            ),
            (
                "cloudwatch_publishes",
                "CloudWatch PutMetricData calls that succeeded",
                &self.cloudwatch_published,
            ),
        ];
        for (name, help, counter) in counters {
            r.register(name, help, counter.clone());
        }
        r.register("ticks", "Scheduler ticks, by result", self.ticks.clone());
        r.register(
            "errors",
            "Errors by kind (transient, or the permanent error's kind) and stage",
            self.errors.clone(),
        );
        r.register(
            "load_duration_seconds",
            "Time to load and move one file (from claim to move)",
            self.load_duration.clone(),
        );
        r.register(
            "table_files",
            "Files by target table and outcome (loaded, already_loaded, failed; failed files without a table count under \"\")",
            self.table_files.clone(),
        );
        r.register("table_rows", "Rows committed, by target table", self.table_rows.clone());
        r.register(
            "table_load_duration_seconds",
            "Time to load and move one file, by target table",
            self.table_load_duration.clone(),
        );
        r.register(
            "list_duration_seconds",
            "Time to list incoming/ (all pages)",
            self.list_duration.clone(),
        );
        let gauges = [
            (
                "backlog_files",
                "Files in incoming/ not yet processed",
                &self.backlog_files,
            ),
            (
                "backlog_bytes",
                "Bytes in incoming/ not yet processed",
                &self.backlog_bytes,
            ),
            ("loads_in_flight", "Loads running now", &self.in_flight),
            (
                "freshness_degraded",
                "1 when the oldest unprocessed file is older than health.max_backlog_age",
                &self.degraded,
            ),
        ];
        for (name, help, gauge) in gauges {
            r.register(name, help, gauge.clone());
        }
        r.register(
            "backlog_oldest_age_seconds",
            "Age of the oldest unprocessed file (0 when none)",
            self.oldest_age_seconds.clone(),
        );
        r.register(
            "build",
            "The loader's version",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        self
    }

    pub fn error(&self, kind: &'static str, stage: &'static str) {
        self.errors.get_or_create(&[("kind", kind), ("stage", stage)]).inc();
    }

    /// Counts a scheduler tick: `ok` when it listed and dispatched.
    pub fn tick(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.ticks.get_or_create(&[("result", result)]).inc();
    }

    /// Ticks so far, whatever their result.
    pub fn ticks(&self) -> u64 {
        ["ok", "error"]
            .iter()
            .map(|r| self.ticks.get_or_create(&[("result", *r)]).get())
            .sum()
    }

    /// One file's outcome for its target table (`""` when it has none).
    pub fn table_file(&self, table: &str, outcome: &'static str, rows: u64, took: Duration) {
        self.table_files
            .get_or_create(&vec![("table", table.to_string()), ("outcome", outcome.to_string())])
            .inc();
        if rows > 0 {
            self.table_rows
                .get_or_create(&vec![("table", table.to_string())])
                .inc_by(rows);
        }
        self.table_load_duration
            .get_or_create(&vec![("table", table.to_string())])
            .observe(took.as_secs_f64());
    }

    pub fn observe_load(&self, d: Duration) {
        let s = d.as_secs_f64();
        self.load_duration.observe(s);
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        w.min = if w.count == 0 { s } else { w.min.min(s) };
        w.max = w.max.max(s);
        w.sum += s;
        w.count += 1;
    }

    pub fn observe_list(&self, d: Duration, calls: u64) {
        self.list_duration.observe(d.as_secs_f64());
        self.list_calls.inc_by(calls);
    }

    /// The load durations since the last call, and a fresh window.
    pub fn take_load_window(&self) -> DurationWindow {
        std::mem::take(&mut *self.window.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Every metric, the gauges as `g` says now, in the format asked for.
    pub fn render(&self, g: &Gauges, format: Exposition) -> String {
        self.backlog_files.set(to_i64(g.backlog_files));
        self.backlog_bytes.set(to_i64(g.backlog_bytes));
        self.oldest_age_seconds.set(g.oldest_age_seconds);
        self.in_flight.set(to_i64(g.in_flight));
        self.degraded.set(i64::from(g.degraded));
        let mut out = String::new();
        let written = match format {
            Exposition::Prometheus => prometheus_text::encode(&mut out, &self.registry),
            Exposition::OpenMetrics => text::encode(&mut out, &self.registry),
        };
        // Writing into a String cannot fail; a metric that could not be encoded is a bug.
        written.expect("metrics encode into a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauges(backlog_files: u64) -> Gauges {
        Gauges {
            backlog_files,
            backlog_bytes: 0,
            oldest_age_seconds: 0.0,
            in_flight: 0,
            degraded: false,
        }
    }

    #[test]
    fn histograms_are_cumulative_and_windows_reset() {
        let m = Metrics::new();
        m.observe_load(Duration::from_millis(20));
        m.observe_load(Duration::from_millis(700));
        m.observe_load(Duration::from_secs(1000));
        let text = m.render(&gauges(0), Exposition::Prometheus);
        for line in [
            "s3_sql_loader_load_duration_seconds_bucket{le=\"0.025\"} 1\n",
            "s3_sql_loader_load_duration_seconds_bucket{le=\"1\"} 2\n",
            "s3_sql_loader_load_duration_seconds_bucket{le=\"+Inf\"} 3\n",
            "s3_sql_loader_load_duration_seconds_count 3\n",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        let w = m.take_load_window();
        assert_eq!((w.count, w.min, w.max), (3, 0.02, 1000.0));
        assert_eq!(m.take_load_window(), DurationWindow::default());
    }

    #[test]
    fn both_expositions_carry_the_documented_names_and_values() {
        let m = Metrics::new();
        m.files_loaded.inc();
        m.tick(true);
        m.tick(false);
        m.tick(true);
        m.error("decode", "decode");
        assert_eq!(m.ticks(), 3);
        let prom = m.render(&gauges(7), Exposition::Prometheus);
        let open = m.render(&gauges(7), Exposition::OpenMetrics);
        for line in [
            "s3_sql_loader_files_loaded_total 1\n",
            "s3_sql_loader_ticks_total{result=\"ok\"} 2\n",
            "s3_sql_loader_ticks_total{result=\"error\"} 1\n",
            "s3_sql_loader_errors_total{kind=\"decode\",stage=\"decode\"} 1\n",
            "s3_sql_loader_backlog_files 7\n",
            "s3_sql_loader_build_info{version=\"0.1.0\"} 1\n",
        ] {
            assert!(prom.contains(line), "{line} missing from\n{prom}");
            assert!(open.contains(line), "{line} missing from\n{open}");
        }
        assert!(
            prom.contains("# TYPE s3_sql_loader_files_loaded_total counter\n"),
            "{prom}"
        );
        assert!(!prom.contains("# EOF"), "{prom}");
        assert!(open.contains("# TYPE s3_sql_loader_files_loaded counter\n"), "{open}");
        assert!(open.ends_with("# EOF\n"), "{open}");
        assert_eq!(
            Exposition::from_accept(Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5")),
            Exposition::OpenMetrics
        );
        assert_eq!(Exposition::from_accept(Some("*/*")), Exposition::Prometheus);
        assert_eq!(Exposition::from_accept(None), Exposition::Prometheus);
    }
}
