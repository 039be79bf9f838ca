//! `s3-sql-loader`: loads flat files that land in `incoming/` of an S3 bucket (or a local folder)
//! into a SQL database exactly once, and moves each to `processed/` (or `failed/` with a report).
//!
//! The path of a file through the modules:
//!
//! - [`scheduler`] ticks every `schedule.interval`: [`source`] lists `incoming/`, [`status`]
//!   records the backlog, and up to `schedule.max_files_per_tick` files go to worker tasks.
//! - [`worker`] waits for a permit and the rate limiter, takes the file's version (the S3 ETag;
//!   for a local folder, [`source::local`] hashes the content), then asks [`sink`] to load it.
//!   For every database that loads file by file, [`sink::protocol`] is the one exactly-once
//!   protocol (claim, count the attempt, write the rows under a savepoint, mark the ledger,
//!   commit); each database brings only its claims, its row writer and its DDL
//!   ([`sink::postgres`] by COPY, [`sink::mysql`] and [`sink::sqlite`] by multi-row INSERTs);
//!   [`sink::redshift`] loads batches by COPY from a manifest.
//! - The sink reads the file through a [`reader::FileReader`]: [`source`] streams the object,
//!   [`format`] decompresses it and decodes it (CSV, JSON lines) on a blocking thread, or passes
//!   CSV bytes through to COPY once the same reader has checked them.
//! - After the commit, [`worker`] moves the object to `processed/`; a bad file gets its
//!   [`report`] written to `failed/K.error.json` (never over another object) and is moved to
//!   `failed/`. A load that panics is caught at
//!   the worker boundary and retried.
//! - [`config`] reads and checks the settings (with [`config::routes`] and
//!   [`config::redshift`]); [`routes`] resolves each key to its table and format; [`schema`] holds
//!   the column types and the one rule of what each accepts.
//! - [`http`] serves health, readiness, status and [`metrics`] from [`status`]; [`shutdown`] turns
//!   SIGTERM into a drain; [`app`] wires it all from a [`config::Config`].
//!
//! Errors are classified at the leaves ([`error::LoadError`]): transient ones leave the file in
//! `incoming/` for a later tick, permanent ones send it to `failed/`.

pub mod app;
pub mod aws;
pub mod cloudwatch;
pub mod config;
pub mod error;
pub mod format;
pub mod http;
pub mod metrics;
pub mod page;
pub mod reader;
pub mod redact;
pub mod report;
pub mod routes;
pub mod scheduler;
pub mod schema;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod status;
pub mod telemetry;
pub mod worker;
