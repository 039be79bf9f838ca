//! Configuration: built-in defaults, then a TOML file (`--config FILE` or `LOADER_CONFIG`), then
//! environment variables `LOADER_<SECTION>__<KEY>`; later wins. Every key is documented in
//! `config/default.toml`. [`Config::load`] reports every problem at once and names the key.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

mod limits;
mod load;
pub mod redshift;
mod reports;
pub mod routes;
mod urls;

pub use self::limits::LimitsConfig;
pub use self::load::SECTIONS;
pub use self::reports::ReportsConfig;
pub use self::urls::{Dialect, SourceUrl, dialect_of, parse_source_url};

/// The whole configuration. Unknown keys anywhere are an error.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Name of this pipeline: a log field and the default CloudWatch dimension value.
    pub pipeline: String,
    pub source: SourceConfig,
    pub database: DatabaseConfig,
    pub schedule: ScheduleConfig,
    pub workers: WorkersConfig,
    pub csv: CsvConfig,
    pub http: HttpConfig,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
    pub cloudwatch: CloudWatchConfig,
    pub retry: RetryConfig,
    pub claim: ClaimConfig,
    pub health: HealthConfig,
    /// Bounds on what one file may make the loader read or hold (invariant 8: no single input
    /// stops the pipeline).
    pub limits: LimitsConfig,
    /// What failure reports and status pages may show of a file's values.
    pub reports: ReportsConfig,
    /// `[[routes]]`: key prefix or glob → table, format and load options.
    pub routes: Vec<routes::RouteConfig>,
    /// `[routing]`: files that match no route.
    pub routing: routes::RoutingConfig,
    /// Amazon Redshift's COPY settings (for `redshift://` database URLs).
    pub redshift: redshift::RedshiftConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            pipeline: "default".into(),
            source: SourceConfig::default(),
            database: DatabaseConfig::default(),
            schedule: ScheduleConfig::default(),
            workers: WorkersConfig::default(),
            csv: CsvConfig::default(),
            http: HttpConfig::default(),
            shutdown: ShutdownConfig::default(),
            log: LogConfig::default(),
            cloudwatch: CloudWatchConfig::default(),
            retry: RetryConfig::default(),
            claim: ClaimConfig::default(),
            health: HealthConfig::default(),
            limits: LimitsConfig::default(),
            reports: ReportsConfig::default(),
            routes: Vec::new(),
            routing: Default::default(),
            redshift: Default::default(),
        }
    }
}

/// Where files come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// `file://DIR` (a local folder) or `s3://BUCKET[/ROOT]`. The folders `incoming/`,
    /// `processed/` and `failed/` live under it.
    pub url: String,
    /// S3 endpoint override for S3-compatible stores; `AWS_ENDPOINT_URL` works as well.
    pub endpoint: Option<String>,
    /// AWS region override; otherwise the standard AWS chain (`AWS_REGION`, profile, ...).
    pub region: Option<String>,
    /// Address buckets as `endpoint/bucket` instead of `bucket.endpoint` (most test servers).
    pub force_path_style: bool,
    /// A file modified more recently than this is assumed to be still being written and is
    /// left for a later tick. Local folders only; S3 objects appear only once complete.
    #[serde(with = "duration")]
    pub settle_time: Duration,
    /// Use `If-None-Match: *` on CopyObject to keep names in `processed/` and `failed/` where
    /// the store is found (by a probe, once) to honour it, as Amazon S3 does: a move then needs
    /// no HEAD first. Elsewhere, and when false, each move checks the destination before and
    /// after copying.
    pub conditional_copy: bool,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            url: "file://./data".into(),
            endpoint: None,
            region: None,
            force_path_style: false,
            settle_time: Duration::from_secs(1),
            conditional_copy: true,
        }
    }
}

/// The target database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://PATH`, `postgres://...` or `mysql://...`. Treated as a secret: never printed.
    pub url: SecretString,
    /// Connection pool size; 0 means `workers.concurrency + 2`. Otherwise more than
    /// `workers.concurrency`: a load briefly needs a second connection.
    pub max_connections: u32,
    /// How long to wait for a connection (also the pool's acquire timeout).
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Name of the ledger table (one row per file identity) in the target database.
    pub ledger_table: String,
    /// Create a missing target table, with column types inferred from the file's first rows.
    pub create_tables: bool,
    /// Infer the types of new columns (only types that keep every value exactly as written);
    /// `false`: every new column is text. Routes can override it and declare types.
    pub infer_types: bool,
    /// PostgreSQL: pass CSV bytes straight to COPY when the loader's reader and COPY are known
    /// to read them alike (checked byte by byte; the parser takes over otherwise). `false`:
    /// every file goes through the loader's parser.
    pub passthrough: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: SecretString::from("sqlite://./data/loader.db"),
            max_connections: 0,
            connect_timeout: Duration::from_secs(10),
            ledger_table: "s3_sql_loader_files".into(),
            create_tables: true,
            infer_types: true,
            passthrough: true,
        }
    }
}

/// When and how much to pick up.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    /// Time between two listings of `incoming/`.
    #[serde(with = "duration")]
    pub interval: Duration,
    /// At most this many files are handed to the workers per tick (oldest first).
    pub max_files_per_tick: usize,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(15),
            max_files_per_tick: 100,
        }
    }
}

/// The worker pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersConfig {
    /// Loads running at once (and so database connections busy loading).
    pub concurrency: usize,
    /// Files started per second at most, across all workers of this process.
    pub files_per_second: u32,
    /// Group commit (PostgreSQL, SQLite): files of existing tables load several to a
    /// transaction, each under its own savepoint, up to this many files...
    pub group_files: usize,
    /// ...and this many bytes (as stored); a larger file loads alone. 1 file: no groups.
    pub group_bytes: u64,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        Self {
            concurrency: 4,
            files_per_second: 50,
            group_files: 20,
            group_bytes: 4 << 20,
        }
    }
}

/// CSV decoding.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CsvConfig {
    /// Field delimiter, one ASCII character (`"\t"` for TSV).
    pub delimiter: String,
    /// Quote character, one ASCII character.
    pub quote: String,
    /// A field equal to this string loads as NULL. The default, the empty string, makes an
    /// empty field NULL.
    pub null: String,
}

impl Default for CsvConfig {
    fn default() -> Self {
        Self {
            delimiter: ",".into(),
            quote: "\"".into(),
            null: String::new(),
        }
    }
}

/// The HTTP server for health, status and metrics.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Serve HTTP at all (`run` only).
    pub enabled: bool,
    /// Address and port to listen on.
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:8080".into(),
        }
    }
}

/// Stopping.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// After SIGTERM/SIGINT, how long in-flight loads may take to finish before the process
    /// exits anyway (their transactions then roll back). Keep it below the orchestrator's
    /// kill timeout (Kubernetes' terminationGracePeriodSeconds, ECS stopTimeout).
    #[serde(with = "duration")]
    pub grace: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(25),
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `auto` (JSON unless standard error is a terminal), `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `s3_sql_loader=debug`; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Auto,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Auto,
    Text,
    Json,
}

/// Transient errors: a file is retried on later ticks with exponential backoff and jitter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// After this many attempts that ended in transient errors (recorded in the ledger), the
    /// file goes to `failed/` with the history of its attempts.
    pub max_attempts: u32,
    /// Wait before the first retry; doubles with each further failure.
    #[serde(with = "duration")]
    pub initial_backoff: Duration,
    /// The wait between retries never exceeds this.
    #[serde(with = "duration")]
    pub max_backoff: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 10,
            initial_backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(300),
        }
    }
}

/// Claims on files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClaimConfig {
    /// How long a claim lasts unless renewed. A loading process renews its claims every third
    /// of this; when one runs out (the process is frozen or cut off), the next loader to find
    /// the file locked ends the holder's database session, which rolls its transaction back,
    /// and loads the file. A process that dies releases its claims at once (its connections
    /// close). PostgreSQL only; SQLite has a single writer.
    #[serde(with = "duration")]
    pub lease: Duration,
}

impl Default for ClaimConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(60),
        }
    }
}

/// Data freshness.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// When the oldest unprocessed file is older than this, `/status` says `"freshness":
    /// "degraded"` (and `/metrics` `s3_sql_loader_freshness_degraded 1`). `0s` turns it off.
    #[serde(with = "duration")]
    pub max_backlog_age: Duration,
    /// Also make `/readyz` fail (503) while freshness is degraded.
    pub fail_readiness_when_degraded: bool,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            max_backlog_age: Duration::from_secs(900),
            fail_readiness_when_degraded: false,
        }
    }
}

/// CloudWatch custom metrics, published at every tick.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudWatchConfig {
    /// Publish at all. Off by default (the embedded default has no AWS).
    pub enabled: bool,
    /// Metric namespace.
    pub namespace: String,
    /// Dimensions on every datapoint; empty means `Pipeline = <pipeline>`.
    pub dimensions: std::collections::BTreeMap<String, String>,
    /// A PutMetricData call that takes longer is abandoned (and counted as failed).
    #[serde(with = "duration")]
    pub timeout: Duration,
}

impl Default for CloudWatchConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            namespace: "S3SqlLoader".into(),
            dimensions: Default::default(),
            timeout: Duration::from_secs(10),
        }
    }
}

/// A configuration that cannot be used; the message lists every problem, one per line.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl Config {
    /// Checks every value and reports all problems at once.
    pub fn validated(self) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        if let Err(e) = self.source_url() {
            problems.push(format!("source.url: {e}"));
        }
        if let Err(e) = self.dialect() {
            problems.push(format!("database.url: {e}"));
        }
        if !crate::schema::is_safe_identifier(&self.database.ledger_table) || self.database.ledger_table.len() > 48 {
            problems.push(format!(
                "database.ledger_table: {:?} is not a safe SQL identifier (letters, digits and _, not starting with a digit, at most 48 characters)",
                self.database.ledger_table
            ));
        }
        if self.schedule.interval < Duration::from_millis(100) {
            problems.push("schedule.interval: must be at least 100ms".into());
        }
        if self.schedule.max_files_per_tick == 0 {
            problems.push("schedule.max_files_per_tick: must be at least 1".into());
        }
        if self.workers.concurrency == 0 || self.workers.concurrency > 256 {
            problems.push("workers.concurrency: must be between 1 and 256".into());
        }
        // Each load holds its transaction's connection and briefly needs one more (the
        // committed attempt count, a lease renewal, MySQL's column look-up): with fewer, every
        // load would wait for a connection that no load gives back.
        let n = self.database.max_connections as usize;
        if n != 0 && n <= self.workers.concurrency {
            problems.push(format!(
                "database.max_connections: must be 0 (workers.concurrency + 2) or more than workers.concurrency ({})",
                self.workers.concurrency
            ));
        }
        if self.workers.group_files == 0 {
            problems.push("workers.group_files: must be at least 1 (1: each file in a transaction of its own)".into());
        }
        if self.workers.files_per_second == 0 {
            problems.push("workers.files_per_second: must be at least 1".into());
        }
        for (key, value) in [("csv.delimiter", &self.csv.delimiter), ("csv.quote", &self.csv.quote)] {
            if single_ascii(value).is_none() {
                problems.push(format!("{key}: must be exactly one ASCII character, got {value:?}"));
            }
        }
        if self.csv.delimiter == self.csv.quote {
            problems.push("csv.quote: must differ from csv.delimiter".into());
        }
        if [self.csv.delimiter.as_str(), self.csv.quote.as_str(), "\n", "\r"]
            .iter()
            .any(|c| !c.is_empty() && self.csv.null.contains(c))
        {
            problems.push(
                "csv.null: must not contain the delimiter, the quote or a line end (COPY refuses such a NULL string)"
                    .into(),
            );
        }
        if self.http.listen.parse::<SocketAddr>().is_err() {
            problems.push(format!(
                "http.listen: expected ADDRESS:PORT such as 127.0.0.1:8080, got {:?}",
                self.http.listen
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            problems.push(format!(
                "log.level: {:?} is not a log filter; use e.g. info, debug or s3_sql_loader=debug",
                self.log.level
            ));
        }
        if self.pipeline.is_empty() || self.pipeline.len() > 200 {
            problems.push("pipeline: must be 1 to 200 characters".into());
        }
        problems.extend(routes::problems(&self.routes));
        if self.dialect() == Ok(Dialect::Redshift) {
            problems.extend(self.redshift.problems());
            for (i, r) in self.routes.iter().enumerate() {
                let append_only = r.write_mode == routes::WriteMode::Append
                    && r.on_new_columns == routes::NewColumns::Fail
                    && !r.metadata_columns;
                if !append_only {
                    problems.push(format!(
                        "routes[{i}]: with Redshift only append loads are supported (no upsert, added columns or lineage columns)"
                    ));
                }
            }
            if !matches!(self.source_url(), Ok(SourceUrl::S3 { .. })) {
                problems.push("source.url: Redshift loads by COPY from S3, so the source must be s3://".into());
            }
        }
        if self.retry.max_attempts == 0 {
            problems.push("retry.max_attempts: must be at least 1".into());
        }
        if self.retry.initial_backoff > self.retry.max_backoff {
            problems.push("retry.initial_backoff: must not exceed retry.max_backoff".into());
        }
        if self.claim.lease < Duration::from_secs(1) {
            problems.push("claim.lease: must be at least 1s".into());
        }
        if self.cloudwatch.namespace.is_empty() || self.cloudwatch.namespace.starts_with("AWS/") {
            problems.push("cloudwatch.namespace: must be non-empty and must not start with AWS/".into());
        }
        if self.cloudwatch.dimensions.len() > 30 {
            problems.push("cloudwatch.dimensions: at most 30 dimensions".into());
        }
        problems.extend(self.limits.problems());
        if problems.is_empty() {
            Ok(self)
        } else {
            Err(ConfigError { problems })
        }
    }

    pub fn source_url(&self) -> Result<SourceUrl, String> {
        parse_source_url(&self.source.url)
    }

    pub fn dialect(&self) -> Result<Dialect, String> {
        dialect_of(self.database.url.expose_secret())
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.http.listen.parse().expect("http.listen was validated at load")
    }

    pub fn csv_delimiter(&self) -> u8 {
        single_ascii(&self.csv.delimiter).expect("csv.delimiter was validated at load")
    }

    pub fn csv_quote(&self) -> u8 {
        single_ascii(&self.csv.quote).expect("csv.quote was validated at load")
    }

    pub fn max_connections(&self) -> u32 {
        match self.database.max_connections {
            0 => self.workers.concurrency as u32 + 2,
            n => n,
        }
    }
}

fn single_ascii(s: &str) -> Option<u8> {
    match s.as_bytes() {
        [b] if b.is_ascii() => Some(*b),
        _ => None,
    }
}

/// Turns one figment error into "key: what is wrong (where it came from)".
/// Durations as humantime strings ("15s", "500ms", "2m") or whole seconds.
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, de};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Seconds(s) => Ok(Duration::from_secs(s)),
            Raw::Text(t) => humantime::parse_duration(t.trim()).map_err(|e| {
                de::Error::custom(format!(
                    "{t:?} is not a duration ({e}); use e.g. \"15s\", \"500ms\", \"2m\" or whole seconds"
                ))
            }),
        }
    }
}

#[cfg(test)]
mod tests;
