//! Every metric the loader exports, declared once: counters and histograms updated by the
//! scheduler and workers, rendered as Prometheus text by [`Metrics::render`] (with the gauges
//! that [`crate::status`] knows), and drained per tick by [`crate::cloudwatch`].
//!
//! Names follow Prometheus conventions: `s3_sql_loader_` prefix, base units (seconds, bytes),
//! `_total` on counters.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bucket bounds (seconds) for per-file load durations.
const LOAD_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Bucket bounds (seconds) for listings of `incoming/`.
const LIST_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Default)]
pub struct Metrics {
    /// Files whose rows were committed.
    pub files_loaded: AtomicU64,
    /// Files found committed earlier and only moved.
    pub files_already_loaded: AtomicU64,
    /// Files moved to failed/.
    pub files_failed: AtomicU64,
    /// Rows committed.
    pub rows_loaded: AtomicU64,
    /// Bytes (as stored) of the files loaded.
    pub bytes_loaded: AtomicU64,
    /// Load attempts that ended in a transient error (the file is retried).
    pub retries: AtomicU64,
    /// Scheduler ticks that listed and dispatched.
    pub ticks_ok: AtomicU64,
    /// Scheduler ticks that failed (listing or database unreachable).
    pub ticks_failed: AtomicU64,
    /// List calls made to the store.
    pub list_calls: AtomicU64,
    /// PutMetricData calls that succeeded / failed or timed out.
    pub cloudwatch_published: AtomicU64,
    pub cloudwatch_failed: AtomicU64,
    /// Errors by (kind, stage).
    errors: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    load_duration: Histogram,
    list_duration: Histogram,
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

struct Histogram {
    bounds: &'static [f64],
    /// One per bound, plus +Inf; not cumulative.
    buckets: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(&[])
    }
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self.bounds.iter().position(|b| s <= *b).unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
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

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            load_duration: Histogram::new(LOAD_BUCKETS),
            list_duration: Histogram::new(LIST_BUCKETS),
            ..Metrics::default()
        }
    }

    pub fn error(&self, kind: &'static str, stage: &'static str) {
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        *errors.entry((kind, stage)).or_default() += 1;
    }

    pub fn observe_load(&self, d: Duration) {
        self.load_duration.observe(d);
        let s = d.as_secs_f64();
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        w.min = if w.count == 0 { s } else { w.min.min(s) };
        w.max = w.max.max(s);
        w.sum += s;
        w.count += 1;
    }

    pub fn observe_list(&self, d: Duration, calls: u64) {
        self.list_duration.observe(d);
        self.list_calls.fetch_add(calls, Ordering::Relaxed);
    }

    /// The load durations since the last call, and a fresh window.
    pub fn take_load_window(&self) -> DurationWindow {
        std::mem::take(&mut *self.window.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Prometheus text exposition (format 0.0.4).
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        };
        counter(
            "s3_sql_loader_files_loaded_total",
            "Files whose rows were committed.",
            Self::get(&self.files_loaded),
        );
        counter(
            "s3_sql_loader_files_already_loaded_total",
            "Files found committed earlier (after a crash or by a replica) and only moved.",
            Self::get(&self.files_already_loaded),
        );
        counter(
            "s3_sql_loader_files_failed_total",
            "Files moved to failed/ with a report.",
            Self::get(&self.files_failed),
        );
        counter(
            "s3_sql_loader_rows_loaded_total",
            "Rows committed.",
            Self::get(&self.rows_loaded),
        );
        counter(
            "s3_sql_loader_bytes_loaded_total",
            "Bytes, as stored, of the files loaded.",
            Self::get(&self.bytes_loaded),
        );
        counter(
            "s3_sql_loader_retries_total",
            "Load attempts that ended in a transient error; the file is retried later.",
            Self::get(&self.retries),
        );
        counter(
            "s3_sql_loader_list_calls_total",
            "List calls made to the store.",
            Self::get(&self.list_calls),
        );
        counter(
            "s3_sql_loader_cloudwatch_publish_failures_total",
            "CloudWatch PutMetricData calls that failed or timed out.",
            Self::get(&self.cloudwatch_failed),
        );
        counter(
            "s3_sql_loader_cloudwatch_publishes_total",
            "CloudWatch PutMetricData calls that succeeded.",
            Self::get(&self.cloudwatch_published),
        );
        let _ = writeln!(
            out,
            "# HELP s3_sql_loader_ticks_total Scheduler ticks, by result.\n# TYPE s3_sql_loader_ticks_total counter\n\
             s3_sql_loader_ticks_total{{result=\"ok\"}} {}\ns3_sql_loader_ticks_total{{result=\"error\"}} {}",
            Self::get(&self.ticks_ok),
            Self::get(&self.ticks_failed)
        );
        let _ = writeln!(
            out,
            "# HELP s3_sql_loader_errors_total Errors by kind (transient, or the permanent error's kind) and stage.\n\
             # TYPE s3_sql_loader_errors_total counter"
        );
        for ((kind, stage), n) in self.errors.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(
                out,
                "s3_sql_loader_errors_total{{kind=\"{kind}\",stage=\"{stage}\"}} {n}"
            );
        }
        self.load_duration.render(
            &mut out,
            "s3_sql_loader_load_duration_seconds",
            "Time to load and move one file (from claim to move).",
        );
        self.list_duration.render(
            &mut out,
            "s3_sql_loader_list_duration_seconds",
            "Time to list incoming/ (all pages).",
        );
        let mut gauge = |name: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        };
        gauge(
            "s3_sql_loader_backlog_files",
            "Files in incoming/ not yet processed.",
            g.backlog_files.to_string(),
        );
        gauge(
            "s3_sql_loader_backlog_bytes",
            "Bytes in incoming/ not yet processed.",
            g.backlog_bytes.to_string(),
        );
        gauge(
            "s3_sql_loader_backlog_oldest_age_seconds",
            "Age of the oldest unprocessed file (0 when none).",
            g.oldest_age_seconds.to_string(),
        );
        gauge(
            "s3_sql_loader_loads_in_flight",
            "Loads running now.",
            g.in_flight.to_string(),
        );
        gauge(
            "s3_sql_loader_freshness_degraded",
            "1 when the oldest unprocessed file is older than health.max_backlog_age.",
            u8::from(g.degraded).to_string(),
        );
        let _ = writeln!(
            out,
            "# HELP s3_sql_loader_build_info The loader's version.\n# TYPE s3_sql_loader_build_info gauge\n\
             s3_sql_loader_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_windows_reset() {
        let m = Metrics::new();
        m.observe_load(Duration::from_millis(20));
        m.observe_load(Duration::from_millis(700));
        m.observe_load(Duration::from_secs(1000));
        let text = m.render(&Gauges {
            backlog_files: 0,
            backlog_bytes: 0,
            oldest_age_seconds: 0.0,
            in_flight: 0,
            degraded: false,
        });
        assert!(
            text.contains("s3_sql_loader_load_duration_seconds_bucket{le=\"0.025\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("s3_sql_loader_load_duration_seconds_bucket{le=\"1\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("s3_sql_loader_load_duration_seconds_bucket{le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("s3_sql_loader_load_duration_seconds_count 3\n"), "{text}");
        let w = m.take_load_window();
        assert_eq!((w.count, w.min, w.max), (3, 0.02, 1000.0));
        assert_eq!(m.take_load_window(), DurationWindow::default());
    }
}
