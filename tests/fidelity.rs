//! Fidelity (DESIGN.md, invariant 7): every value arrives exactly as the file wrote it, or the
//! file fails whole, whatever path and database it takes. Differential tests with the real
//! binary:
//!
//! - A seeded generator writes a few hundred small CSV/TSV files, one table each, full of the
//!   inputs that trip loaders up (quotes, embedded line ends, odd delimiters, BOM, NUL, invalid
//!   UTF-8, leading zeros, decimals, huge integers, non-ISO dates, timestamps ...).
//! - One `once` run loads the same folder into each sink: SQLite, PostgreSQL with raw
//!   pass-through to COPY (the default), PostgreSQL through the loader's own parser
//!   (`database.passthrough = false`), and MariaDB. Every file must end in `failed/` in every
//!   sink (with a report, and no rows), or in `processed/` in every sink with equal tables.
//! - The oracle is PostgreSQL's own CSV parser: each file is also COPYed into a table of `text`
//!   columns. Where COPY accepts a file, both PostgreSQL sinks must have loaded it, and every
//!   cell cast back to text must be COPY's text.
//!
//! Tables are compared as multisets of rows (sorted), not ordered by the lineage column `_line`:
//! lineage (`metadata_columns`) switches the PostgreSQL pass-through off, and the pass-through
//! is one of the paths under test.
//!
//! `FIDELITY_SEED` and `FIDELITY_FILES` override the seed and the number of generated files
//! (for a longer fuzzing run by hand); the suite's run uses the fixed defaults.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use chrono::{Datelike, NaiveDateTime, Timelike};
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::{AssertSqlSafe, Row};

const DEFAULT_SEED: u64 = 0x5eed_f1de_1171;
const DEFAULT_FILES: usize = 300;

// ------------------------------------------------------------------------------------------
// The generator
// ------------------------------------------------------------------------------------------

/// One generated input file.
#[derive(Debug, Clone)]
struct Generated {
    /// The target table, `f0001`.
    table: String,
    /// Relative to `incoming/`: `f0001/x.csv`.
    key: String,
    delimiter: u8,
    /// Fields in the header line (the oracle's table gets as many text columns).
    width: usize,
    bytes: Vec<u8>,
    /// What the generator put in, for messages.
    features: Vec<String>,
}

/// What a column's values look like.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Int,
    BigInt,
    LeadingZero,
    Decimal,
    Float,
    Bool,
    IsoDate,
    OtherDate,
    Timestamp,
    TimestampTz,
    Text,
    Mixed,
}

const KINDS: [Kind; 12] = [
    Kind::Int,
    Kind::BigInt,
    Kind::LeadingZero,
    Kind::Decimal,
    Kind::Float,
    Kind::Bool,
    Kind::IsoDate,
    Kind::OtherDate,
    Kind::Timestamp,
    Kind::TimestampTz,
    Kind::Text,
    Kind::Mixed,
];

/// Header names: safe identifiers, distinct even lowercased.
const NAMES: [&str; 16] = [
    "id",
    "a",
    "b",
    "zip",
    "amount",
    "d",
    "n",
    "note",
    "Price",
    "created_at",
    "flag",
    "QTY",
    "city",
    "ts",
    "x1",
    "_extra",
];

/// Pieces of free text: delimiters, quotes, line ends, backslashes, NULL look-alikes, non-ASCII.
const PIECES: [&str; 32] = [
    "a", "b", "Zz", "hello", " ", "  ", "é", "中文", "😀", ",", ";", "|", "\t", "\"", "\"\"", "'", "\\", "\\N", "NULL",
    "null", "\n", "\r\n", "\r", "#", "0", "-", ".", "\\.", "x y", "007", "1.50", "true",
];

fn pick<T: Copy>(rng: &mut StdRng, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

fn value(rng: &mut StdRng, kind: Kind) -> String {
    match kind {
        Kind::Int => match rng.random_range(0..8) {
            0 => pick(rng, &["0", "-0", "+7", "9223372036854775807", "-9223372036854775808"]).to_string(),
            _ => rng.random_range(-100_000i64..1_000_000).to_string(),
        },
        Kind::BigInt => pick(
            rng,
            &[
                "9223372036854775807",
                "-9223372036854775808",
                "9223372036854775808",
                "-9223372036854775809",
                "12345678901234567890",
                "99999999999999999999999999999",
            ],
        )
        .to_string(),
        Kind::LeadingZero => match rng.random_range(0..3) {
            0 => format!("0{}", rng.random_range(0..100_000)),
            _ => pick(rng, &["007", "08123", "0", "00", "0001", "-007", "010"]).to_string(),
        },
        Kind::Decimal => match rng.random_range(0..5) {
            0 => pick(
                rng,
                &[
                    "129.90",
                    "2400.00",
                    "0.10",
                    "1.0",
                    ".5",
                    "5.",
                    "-0.0",
                    "+1.25",
                    "1234567890123456789.123456789",
                    "0.000",
                ],
            )
            .to_string(),
            _ => {
                let scale = rng.random_range(1..5u32);
                let frac = rng.random_range(0..10u64.pow(scale));
                format!("{}.{frac:0w$}", rng.random_range(-5000i64..50_000), w = scale as usize)
            }
        },
        Kind::Float => pick(
            rng,
            &[
                "1E2", "1e-3", "2.5e10", "1.5", "0.1", "-2.75", "1e400", "3.14159", "6.02E23", "1.5E+3",
            ],
        )
        .to_string(),
        Kind::Bool => {
            let v = if rng.random_bool(0.7) {
                pick(rng, &["true", "false"])
            } else {
                pick(rng, &["TRUE", "False", "t", "f", "yes", "1", "0"])
            };
            v.to_string()
        }
        Kind::IsoDate => match rng.random_range(0..8) {
            0 => pick(
                rng,
                &[
                    "0001-01-01",
                    "9999-12-31",
                    "2024-02-29",
                    "2023-02-29",
                    "0000-01-01",
                    "1970-01-01",
                ],
            )
            .to_string(),
            _ => format!(
                "{:04}-{:02}-{:02}",
                rng.random_range(1900..2100),
                rng.random_range(1..13),
                rng.random_range(1..29)
            ),
        },
        Kind::OtherDate => pick(
            rng,
            &[
                "1-02-03",
                "5-6-7",
                "15-06-05",
                "2026-1-5",
                "2026/01/05",
                "01/02/2026",
                "20260105",
                "99-12-31",
                "2026-01-05 ",
                " 2026-01-05",
                "+2026-01-05",
            ],
        )
        .to_string(),
        Kind::Timestamp => timestamp(rng, false),
        Kind::TimestampTz => timestamp(rng, true),
        Kind::Text => (0..rng.random_range(0..5)).map(|_| pick(rng, &PIECES)).collect(),
        Kind::Mixed => {
            let kind = pick(rng, &KINDS[..11]);
            value(rng, kind)
        }
    }
}

/// A timestamp with 0 to 9 fractional digits, `T` or a space, and with `zone` an offset.
fn timestamp(rng: &mut StdRng, zone: bool) -> String {
    if rng.random_range(0..8) == 0 {
        return if zone {
            "9999-12-31T23:59:59.9999999Z"
        } else {
            "9999-12-31T23:59:59.9999999"
        }
        .to_string();
    }
    let mut s = format!(
        "{:04}-{:02}-{:02}{}{:02}:{:02}:{:02}",
        rng.random_range(1970..2100),
        rng.random_range(1..13),
        rng.random_range(1..29),
        if rng.random_bool(0.5) { 'T' } else { ' ' },
        rng.random_range(0..24),
        rng.random_range(0..60),
        rng.random_range(0..60)
    );
    let digits = rng.random_range(0..10);
    if digits > 0 {
        s.push('.');
        for _ in 0..digits {
            s.push(char::from(b'0' + rng.random_range(0..10u8)));
        }
    }
    if zone {
        s.push_str(pick(rng, &["Z", "z", "+02:00", "-05:30", "+00:00"]));
    }
    s
}

/// A field as written: quoted when it must be (or at random), `""` for an empty string.
fn render(text: &[u8], delimiter: u8, force_quotes: bool) -> Vec<u8> {
    let must = text.is_empty()
        || text
            .iter()
            .any(|&b| b == delimiter || b == b'"' || b == b'\n' || b == b'\r');
    if !(must || force_quotes) {
        return text.to_vec();
    }
    let mut out = vec![b'"'];
    for &b in text {
        if b == b'"' {
            out.push(b'"');
        }
        out.push(b);
    }
    out.push(b'"');
    out
}

fn cell(rng: &mut StdRng, kind: Kind, delimiter: u8) -> Vec<u8> {
    match rng.random_range(0..100) {
        0..8 => Vec::new(),        // NULL: an empty unquoted field
        8..13 => b"\"\"".to_vec(), // an empty string
        _ => {
            let v = value(rng, kind);
            render(v.as_bytes(), delimiter, rng.random_bool(0.15))
        }
    }
}

fn generate(seed: u64, count: usize) -> Vec<Generated> {
    let mut rng = StdRng::seed_from_u64(seed);
    (1..=count).map(|n| generate_file(&mut rng, n)).collect()
}

fn generate_file(rng: &mut StdRng, n: usize) -> Generated {
    let table = format!("f{n:04}");
    let (delimiter, ext) = match rng.random_range(0..100) {
        0..60 => (b',', "csv"),
        60..75 => (b'\t', "tsv"),
        75..88 => (b';', "csv"),
        _ => (b'|', "csv"),
    };
    let mut features = vec![format!("delimiter {:?}", delimiter as char)];
    let width = rng.random_range(1..5);
    let mut names = NAMES.to_vec();
    for i in 0..width {
        let j = rng.random_range(i..names.len());
        names.swap(i, j);
    }
    let header: Vec<Vec<u8>> = names[..width].iter().map(|s| s.as_bytes().to_vec()).collect();
    let kinds: Vec<Kind> = (0..width).map(|_| pick(rng, &KINDS)).collect();
    features.push(format!("kinds {kinds:?}"));
    let rows = if rng.random_bool(0.08) {
        features.push("header only".into());
        0
    } else {
        rng.random_range(1..8)
    };
    let mut records: Vec<Vec<Vec<u8>>> = (0..rows)
        .map(|_| kinds.iter().map(|k| cell(rng, *k, delimiter)).collect())
        .collect();

    // Hostile bytes, each in a few files.
    let mut feature = |rng: &mut StdRng, percent: u32, name: &str| {
        let on = rows > 0 && rng.random_range(0..100) < percent;
        if on {
            features.push(name.to_string());
        }
        on
    };
    if feature(rng, 2, "a 100 KB field") {
        let (r, c) = (rng.random_range(0..rows), rng.random_range(0..width));
        let long = "long text, with \"quotes\" and commas; ".repeat(100_000 / 37 + 1);
        records[r][c] = render(&long.as_bytes()[..100_000], delimiter, true);
    }
    if feature(rng, 3, "a NUL byte") {
        let (r, c) = (rng.random_range(0..rows), rng.random_range(0..width));
        records[r][c] = render(b"a\0b", delimiter, rng.random_bool(0.5));
    }
    if width >= 2 && feature(rng, 5, "invalid UTF-8 split across two fields") {
        let (r, c) = (rng.random_range(0..rows), rng.random_range(0..width - 1));
        records[r][c] = b"x\xc3".to_vec();
        records[r][c + 1] = b"\xa9y".to_vec();
    } else if feature(rng, 2, "an invalid UTF-8 byte") {
        let (r, c) = (rng.random_range(0..rows), rng.random_range(0..width));
        records[r][c] = b"ab\xff".to_vec();
    }
    if feature(rng, 2, "a quote inside an unquoted field") {
        let (r, c) = (rng.random_range(0..rows), rng.random_range(0..width));
        records[r][c] = b"5\" disk".to_vec();
    }
    if feature(rng, 2, "text after a closing quote") {
        let (r, c) = (rng.random_range(0..rows), rng.random_range(0..width));
        records[r][c] = b"\"x\"y".to_vec();
    }
    if feature(rng, 4, "a bad first row") {
        ragged(rng, &mut records[0], delimiter);
    } else if rows >= 2 && feature(rng, 5, "a ragged row") {
        let r = rng.random_range(1..rows);
        ragged(rng, &mut records[r], delimiter);
    }
    let unclosed = feature(rng, 2, "an unclosed quote");
    if unclosed {
        let last = records.last_mut().unwrap();
        *last.last_mut().unwrap() = b"\"never closed".to_vec();
    }
    let mut lines: Vec<Vec<u8>> = std::iter::once(header)
        .chain(records)
        .map(|fields| fields.join(&delimiter))
        .collect();
    if feature(rng, 3, "a line holding only \\.") {
        let at = rng.random_range(1..=lines.len());
        lines.insert(at, b"\\.".to_vec());
    }
    if rng.random_range(0..100) < 6 {
        features.push("a blank first line".into());
        lines.insert(0, Vec::new());
    }
    if rng.random_range(0..100) < 6 {
        features.push("a blank line".into());
        let at = rng.random_range(1..=lines.len());
        lines.insert(at, Vec::new());
    }
    if rng.random_range(0..100) < 6 {
        features.push("a blank last line".into());
        lines.push(Vec::new());
    }
    let ends: &[&[u8]] = match rng.random_range(0..100) {
        0..55 => &[b"\n"],
        55..80 => {
            features.push("CRLF".into());
            &[b"\r\n"]
        }
        80..88 => {
            features.push("bare CR".into());
            &[b"\r"]
        }
        _ => {
            features.push("mixed line ends".into());
            &[b"\n", b"\r\n", b"\r"]
        }
    };
    let mut bytes = Vec::new();
    if rng.random_range(0..100) < 6 {
        features.push("a BOM".into());
        bytes.extend_from_slice(b"\xEF\xBB\xBF");
    }
    let trailing = !unclosed && rng.random_range(0..100) < 85;
    if !trailing {
        features.push("no final line end".into());
    }
    for (i, line) in lines.iter().enumerate() {
        bytes.extend_from_slice(line);
        if i + 1 < lines.len() || trailing {
            bytes.extend_from_slice(pick(rng, ends));
        }
    }
    if rng.random_range(0..200) == 0 {
        features = vec!["an empty file".into()];
        bytes.clear();
    }
    Generated {
        key: format!("{table}/x.{ext}"),
        table,
        delimiter,
        width,
        bytes,
        features,
    }
}

/// One field more or one less.
fn ragged(rng: &mut StdRng, record: &mut Vec<Vec<u8>>, delimiter: u8) {
    if record.len() > 1 && rng.random_bool(0.5) {
        record.pop();
    } else {
        record.push(render(b"extra", delimiter, false));
    }
}

/// The routes for the files whose delimiter is neither a comma nor (for `.tsv`) a tab.
fn routes_toml(files: &[Generated]) -> String {
    let mut toml = String::from("# generated by tests/fidelity.rs\n");
    for f in files.iter().filter(|f| f.delimiter == b';' || f.delimiter == b'|') {
        writeln!(
            toml,
            "[[routes]]\nprefix = \"{}/\"\ndelimiter = \"{}\"\n",
            f.table, f.delimiter as char
        )
        .unwrap();
    }
    toml
}

// ------------------------------------------------------------------------------------------
// The sinks
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SinkKind {
    Sqlite,
    Postgres,
    PostgresParser,
    MariaDb,
}

const SINKS: [SinkKind; 4] = [
    SinkKind::Sqlite,
    SinkKind::Postgres,
    SinkKind::PostgresParser,
    SinkKind::MariaDb,
];

impl SinkKind {
    fn name(self) -> &'static str {
        match self {
            SinkKind::Sqlite => "sqlite",
            SinkKind::Postgres => "postgres (passthrough)",
            SinkKind::PostgresParser => "postgres (parser)",
            SinkKind::MariaDb => "mariadb",
        }
    }
}

/// A loader setup: its own folder (a copy of the input) and its own database.
struct Sink {
    kind: SinkKind,
    db: AnyDb,
    dir: tempfile::TempDir,
}

/// Where a file ended.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Loaded,
    /// In `failed/`; the report's error, `None` when there is no report.
    Failed(Option<String>),
    /// Still in `incoming/`: a transient error, or the loader never ran.
    Stuck,
    Vanished,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Loaded => write!(f, "loaded (processed/)"),
            Outcome::Failed(Some(why)) => write!(f, "failed: {why}"),
            Outcome::Failed(None) => write!(f, "failed, WITHOUT a .error.json report"),
            Outcome::Stuck => write!(f, "still in incoming/"),
            Outcome::Vanished => write!(f, "in none of incoming/, processed/, failed/"),
        }
    }
}

/// How a column's values are compared, from the column's type in the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Bool,
    Int,
    Float,
    Decimal,
    Date,
    Timestamp,
    TimestampTz,
    Text,
}

/// A table as read back: columns (name, class, declared type) and rows of cells as the
/// database spells them in text (`None` is NULL). PostgreSQL timestamps come as
/// `YYYY-MM-DD HH:MM:SS.ffffff` (UTC for timestamptz).
#[derive(Debug, Clone, Default)]
struct Table {
    columns: Vec<(String, Class, String)>,
    rows: Vec<Vec<Option<String>>>,
}

type Rows = Vec<Vec<Option<String>>>;

impl Table {
    /// Rows with each cell in its canonical form, sorted.
    fn canonical(&self) -> Rows {
        let mut rows: Rows = self
            .rows
            .iter()
            .map(|r| {
                r.iter()
                    .zip(&self.columns)
                    .map(|(v, (_, class, _))| canonical(*class, v.as_deref()))
                    .collect()
            })
            .collect();
        rows.sort();
        rows
    }

    fn names(&self) -> Vec<&str> {
        self.columns.iter().map(|(n, _, _)| n.as_str()).collect()
    }

    fn describe_columns(&self) -> String {
        self.columns
            .iter()
            .map(|(n, _, t)| format!("{n} {t}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

const PG_TIMESTAMP: &str = "YYYY-MM-DD HH24:MI:SS.US";

impl Sink {
    async fn create(kind: SinkKind, test: &str) -> Sink {
        let dir = tempfile::tempdir().unwrap();
        let db = match kind {
            SinkKind::Sqlite => AnyDb::sqlite(dir.path()).await,
            SinkKind::Postgres => AnyDb::postgres(&format!("{test}_pt")).await,
            SinkKind::PostgresParser => AnyDb::postgres(&format!("{test}_pp")).await,
            SinkKind::MariaDb => AnyDb::mysql(test).await,
        };
        Sink { kind, db, dir }
    }

    async fn create_all(test: &str) -> Vec<Sink> {
        let (a, b, c, d) = tokio::join!(
            Sink::create(SINKS[0], test),
            Sink::create(SINKS[1], test),
            Sink::create(SINKS[2], test),
            Sink::create(SINKS[3], test),
        );
        vec![a, b, c, d]
    }

    fn name(&self) -> &'static str {
        self.kind.name()
    }

    /// Writes this sink's own copy of the input files and the routes.
    fn write(&self, files: &[(&str, &[u8])], routes: &str) {
        let incoming = self.dir.path().join("data/incoming");
        for (key, bytes) in files {
            write_old(&incoming.join(key), bytes);
        }
        std::fs::write(self.dir.path().join("routes.toml"), routes).unwrap();
    }

    fn env(&self) -> Vec<(String, String)> {
        let mut env = kv(&[
            ("LOADER_DATABASE__URL", self.db.url()),
            ("LOADER_CONFIG", "routes.toml"),
            ("LOADER_SCHEDULE__MAX_FILES_PER_TICK", "100000"),
            ("LOADER_WORKERS__FILES_PER_SECOND", "100000"),
        ]);
        if self.kind == SinkKind::PostgresParser {
            // Every file through the loader's own parser, none passed straight to COPY.
            env.push(("LOADER_DATABASE__PASSTHROUGH".into(), "false".into()));
        }
        env
    }

    /// `once` over this sink's folder; returns its output.
    async fn run_once(&self) -> String {
        let (dir, env) = (self.dir.path().to_path_buf(), self.env());
        let (status, stdout, stderr) = tokio::task::spawn_blocking(move || run(&dir, &["once"], &env))
            .await
            .unwrap();
        format!("{status}\n{stdout}{stderr}")
    }

    fn outcome(&self, key: &str) -> Outcome {
        let data = self.dir.path().join("data");
        if data.join("processed").join(key).is_file() {
            Outcome::Loaded
        } else if data.join("failed").join(key).is_file() {
            Outcome::Failed(report(&data.join("failed").join(format!("{key}.error.json"))))
        } else if data.join("incoming").join(key).is_file() {
            Outcome::Stuck
        } else {
            Outcome::Vanished
        }
    }

    /// The table's columns and rows, or `None` when it does not exist.
    async fn table(&self, table: &str) -> Option<Table> {
        match &self.db {
            AnyDb::Postgres(d) => pg_table(&d.pool, table).await,
            AnyDb::MySql(d) => mysql_table(&d.pool, table).await,
            AnyDb::Sqlite { pool, .. } => sqlite_table(pool, table).await,
        }
    }
}

/// The report's error in one line, or `None` when there is no report.
fn report(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let Ok(report) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Some(format!("(unreadable report) {}", String::from_utf8_lossy(&bytes)));
    };
    let e = &report["error"];
    let mut s = format!(
        "{}: {}",
        e["kind"].as_str().unwrap_or("?"),
        e["message"].as_str().unwrap_or("?")
    );
    if let Some(db) = e["database_message"].as_str() {
        write!(s, " (database: {db})").unwrap();
    }
    Some(s)
}

fn quote_pg(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

async fn pg_table(pool: &sqlx::PgPool, table: &str) -> Option<Table> {
    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text FROM information_schema.columns
         WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap();
    if columns.is_empty() {
        return None;
    }
    let columns: Vec<(String, Class, String)> = columns
        .into_iter()
        .map(|(name, ty)| {
            let class = match ty.as_str() {
                "bigint" | "integer" | "smallint" => Class::Int,
                "double precision" | "real" => Class::Float,
                "numeric" => Class::Decimal,
                "boolean" => Class::Bool,
                "date" => Class::Date,
                "timestamp without time zone" => Class::Timestamp,
                "timestamp with time zone" => Class::TimestampTz,
                _ => Class::Text,
            };
            (name, class, ty)
        })
        .collect();
    let select = columns
        .iter()
        .map(|(name, class, _)| {
            let c = quote_pg(name);
            match class {
                Class::Timestamp => format!("to_char({c}, '{PG_TIMESTAMP}')"),
                Class::TimestampTz => format!("to_char({c} AT TIME ZONE 'UTC', '{PG_TIMESTAMP}')"),
                _ => format!("{c}::text"),
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    let rows = sqlx::query(AssertSqlSafe(format!("SELECT {select} FROM {}", quote_pg(table))))
        .fetch_all(pool)
        .await
        .unwrap();
    let rows = rows
        .iter()
        .map(|row| {
            (0..columns.len())
                .map(|i| row.try_get::<Option<String>, _>(i).unwrap())
                .collect()
        })
        .collect();
    Some(Table { columns, rows })
}

async fn mysql_table(pool: &sqlx::MySqlPool, table: &str) -> Option<Table> {
    let columns: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT CAST(COLUMN_NAME AS CHAR), CAST(DATA_TYPE AS CHAR), CAST(COLUMN_TYPE AS CHAR)
         FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap();
    if columns.is_empty() {
        return None;
    }
    let columns: Vec<(String, Class, String)> = columns
        .into_iter()
        .map(|(name, ty, full)| {
            let class = match ty.to_ascii_lowercase().as_str() {
                "bigint" | "int" | "integer" | "mediumint" | "smallint" => Class::Int,
                "tinyint" | "boolean" | "bool" => Class::Bool,
                "double" | "float" | "real" => Class::Float,
                "decimal" | "numeric" => Class::Decimal,
                "date" => Class::Date,
                // The loader's sessions run in UTC, so DATETIME holds UTC for offsets.
                "datetime" | "timestamp" => Class::Timestamp,
                _ => Class::Text,
            };
            (name, class, full)
        })
        .collect();
    let select = columns
        .iter()
        .map(|(name, _, _)| format!("CAST(`{}` AS CHAR)", name.replace('`', "``")))
        .collect::<Vec<_>>()
        .join(", ");
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT {select} FROM `{}`",
        table.replace('`', "``")
    )))
    .fetch_all(pool)
    .await
    .unwrap();
    let rows = rows
        .iter()
        .map(|row| {
            (0..columns.len())
                .map(|i| {
                    row.try_get_unchecked::<Option<Vec<u8>>, _>(i)
                        .unwrap()
                        .map(|b| bytes_text(&b))
                })
                .collect()
        })
        .collect();
    Some(Table { columns, rows })
}

async fn sqlite_table(pool: &sqlx::SqlitePool, table: &str) -> Option<Table> {
    let columns: Vec<(String, String)> = sqlx::query_as("SELECT name, type FROM pragma_table_info(?1) ORDER BY cid")
        .bind(table)
        .fetch_all(pool)
        .await
        .unwrap();
    if columns.is_empty() {
        return None;
    }
    let columns: Vec<(String, Class, String)> = columns
        .into_iter()
        .map(|(name, ty)| {
            // SQLite's affinity rules, refined as the loader declares its types.
            let d = ty.to_ascii_uppercase();
            let class = if d.contains("INT") {
                Class::Int
            } else if d.contains("REAL") || d.contains("FLOA") || d.contains("DOUB") {
                Class::Float
            } else if d.contains("BOOL") {
                Class::Bool
            } else if d.contains("NUMERIC") || d.contains("DECIMAL") {
                Class::Decimal
            } else if d == "TIMESTAMPTZ" {
                Class::TimestampTz
            } else if d.contains("TIMESTAMP") || d.contains("DATETIME") {
                Class::Timestamp
            } else if d == "DATE" {
                Class::Date
            } else {
                Class::Text
            };
            (name, class, ty)
        })
        .collect();
    let select = columns
        .iter()
        .map(|(name, _, _)| {
            let c = quote_pg(name);
            format!("typeof({c}), {c}")
        })
        .collect::<Vec<_>>()
        .join(", ");
    let rows = sqlx::query(AssertSqlSafe(format!("SELECT {select} FROM {}", quote_pg(table))))
        .fetch_all(pool)
        .await
        .unwrap();
    let rows = rows
        .iter()
        .map(|row| {
            (0..columns.len())
                .map(|i| {
                    let storage: String = row.try_get(2 * i).unwrap();
                    match storage.as_str() {
                        "null" => None,
                        "integer" => Some(row.try_get_unchecked::<i64, _>(2 * i + 1).unwrap().to_string()),
                        "real" => Some(row.try_get_unchecked::<f64, _>(2 * i + 1).unwrap().to_string()),
                        "text" => Some(bytes_text(&row.try_get_unchecked::<Vec<u8>, _>(2 * i + 1).unwrap())),
                        other => Some(format!(
                            "({other}) {}",
                            escape(&row.try_get_unchecked::<Vec<u8>, _>(2 * i + 1).unwrap())
                        )),
                    }
                })
                .collect()
        })
        .collect();
    Some(Table { columns, rows })
}

/// Text as stored; bytes that are not UTF-8 are shown escaped, with a marker.
fn bytes_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => format!("(invalid UTF-8) {}", escape(bytes)),
    }
}

/// A cell's canonical form: booleans as true/false, floats in Rust's shortest round-trip
/// form, timestamps as `YYYY-MM-DD HH:MM:SS[.f]` (UTC) without trailing fractional zeros;
/// everything else (text, integers, decimals, dates) exactly as the database spells it.
fn canonical(class: Class, value: Option<&str>) -> Option<String> {
    let v = value?;
    Some(match class {
        Class::Bool => match v {
            "1" | "t" | "true" => "true".into(),
            "0" | "f" | "false" => "false".into(),
            other => other.into(),
        },
        Class::Float => v.parse::<f64>().map_or_else(|_| v.to_string(), |f| f.to_string()),
        Class::Timestamp | Class::TimestampTz => canonical_timestamp(v),
        Class::Int | Class::Decimal | Class::Date | Class::Text => v.to_string(),
    })
}

fn canonical_timestamp(v: &str) -> String {
    let parse = |v: &str| {
        chrono::DateTime::parse_from_rfc3339(v)
            .map(|t| t.naive_utc())
            .ok()
            .or_else(|| {
                ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"]
                    .iter()
                    .find_map(|f| NaiveDateTime::parse_from_str(v, f).ok())
            })
    };
    // chrono wants a sign before a year of more than four digits (PostgreSQL prints none).
    let long_year = v.bytes().take_while(u8::is_ascii_digit).count() > 4;
    let parsed = parse(v).or_else(|| long_year.then(|| parse(&format!("+{v}"))).flatten());
    let Some(t) = parsed else {
        return format!("(not a timestamp) {v}");
    };
    let mut s = format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    if t.nanosecond() > 0 {
        write!(s, ".{}", format!("{:09}", t.nanosecond()).trim_end_matches('0')).unwrap();
    }
    s
}

// ------------------------------------------------------------------------------------------
// The oracle: PostgreSQL's COPY ... CSV into text columns
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Oracle {
    /// Not compared with COPY's reading (why).
    Excluded(&'static str),
    /// COPY refused the file (its message).
    Refused(String),
    /// COPY's rows, as text, sorted.
    Accepted(Rows),
}

/// Why COPY's reading of a file differs from the loader's on purpose, if it does.
fn oracle_exclusion(bytes: &[u8], delimiter: u8) -> Option<&'static str> {
    // COPY takes a line holding only `\.` as its end-of-data marker and stops reading there
    // (checked on every physical line: conservative, a quoted one would be data).
    if bytes.split(|&b| b == b'\n' || b == b'\r').any(|line| line == b"\\.") {
        return Some("a line holding only \\. (COPY's end-of-data marker)");
    }
    // COPY's HEADER skips the first line as it is, BOM included, but keeps the BOM in the
    // first column's name where it matches names; the loader strips it.
    if bytes.starts_with(b"\xEF\xBB\xBF") {
        return Some("a BOM (COPY keeps it in the first column name)");
    }
    let mut in_quotes = false;
    let mut just_closed = false;
    let mut at_field_start = true;
    let mut line_len = 0usize;
    let mut first_line = true;
    let mut after_cr = false;
    for &b in bytes {
        if after_cr {
            after_cr = false;
            if b == b'\n' {
                continue;
            }
        }
        if in_quotes {
            if b == b'"' {
                in_quotes = false;
                just_closed = true;
            }
            continue;
        }
        if just_closed {
            just_closed = false;
            if b == b'"' {
                in_quotes = true; // a doubled quote
                continue;
            }
            if b != delimiter && b != b'\n' && b != b'\r' {
                // COPY appends the text to the field; the loader refuses the file as malformed.
                return Some("text after a closing quote (COPY appends it, the loader refuses)");
            }
        }
        match b {
            b'\n' | b'\r' => {
                if line_len == 0 {
                    return Some(if first_line {
                        // COPY's HEADER skips the blank line, then reads the header as data.
                        "a blank first line (COPY's HEADER skips it and reads the header as data)"
                    } else {
                        // COPY reads a row of NULLs (or refuses a short row); the loader skips it.
                        "a blank line (COPY reads a row of NULLs where the loader skips the line)"
                    });
                }
                first_line = false;
                line_len = 0;
                at_field_start = true;
                after_cr = b == b'\r';
            }
            b'"' if !at_field_start => {
                // COPY starts a quoted section mid-field; the loader keeps the quote as text
                // (RFC 4180 leaves such a field undefined).
                return Some("a quote inside an unquoted field (COPY opens a quoted section there)");
            }
            b'"' => {
                in_quotes = true;
                at_field_start = false;
                line_len += 1;
            }
            _ => {
                at_field_start = b == delimiter;
                line_len += 1;
            }
        }
    }
    None
}

/// COPY reads the file into a fresh table of `width` text columns.
async fn oracle_read(pool: &sqlx::PgPool, f: &Generated) -> Oracle {
    if let Some(why) = oracle_exclusion(&f.bytes, f.delimiter) {
        return Oracle::Excluded(why);
    }
    let table = quote_pg(&f.table);
    let columns = (1..=f.width)
        .map(|i| format!("c{i} text"))
        .collect::<Vec<_>>()
        .join(", ");
    sqlx::query(AssertSqlSafe(format!("CREATE TABLE {table} ({columns})")))
        .execute(pool)
        .await
        .unwrap();
    let statement = format!(
        "COPY {table} FROM STDIN WITH (FORMAT csv, HEADER true, DELIMITER E'\\x{:02x}')",
        f.delimiter
    );
    let mut conn = pool.acquire().await.unwrap();
    let copied = match conn.copy_in_raw(&statement).await {
        Ok(mut copy) => {
            let sent = if f.bytes.is_empty() {
                Ok(())
            } else {
                copy.send(f.bytes.as_slice()).await.map(|_| ())
            };
            match sent {
                Ok(()) => copy.finish().await,
                Err(e) => {
                    let _ = copy.abort("send failed").await;
                    Err(e)
                }
            }
        }
        Err(e) => Err(e),
    };
    if let Err(e) = copied {
        conn.close_on_drop();
        return Oracle::Refused(e.to_string());
    }
    drop(conn);
    let select = (1..=f.width).map(|i| format!("c{i}")).collect::<Vec<_>>().join(", ");
    let rows = sqlx::query(AssertSqlSafe(format!("SELECT {select} FROM {table}")))
        .fetch_all(pool)
        .await
        .unwrap();
    let mut rows: Rows = rows
        .iter()
        .map(|row| {
            (0..f.width)
                .map(|i| row.try_get::<Option<String>, _>(i).unwrap())
                .collect()
        })
        .collect();
    rows.sort();
    Oracle::Accepted(rows)
}

/// COPY's text cells of one column as PostgreSQL spells them once cast to the loaded column's
/// timestamp type (same format as [`pg_table`]); `None` if some cell is no such timestamp.
async fn as_pg_timestamps(
    pool: &sqlx::PgPool,
    values: Vec<Option<String>>,
    class: Class,
) -> Option<Vec<Option<String>>> {
    let cast = match class {
        Class::Timestamp => format!("to_char(v::timestamp, '{PG_TIMESTAMP}')"),
        _ => format!("to_char(v::timestamptz AT TIME ZONE 'UTC', '{PG_TIMESTAMP}')"),
    };
    sqlx::query_scalar::<_, Option<String>>(AssertSqlSafe(format!(
        "SELECT {cast} FROM unnest($1::text[]) WITH ORDINALITY AS u(v, n) ORDER BY n"
    )))
    .bind(values)
    .fetch_all(pool)
    .await
    .ok()
}

/// More than six fractional digits that are not all zeros: a timestamp column keeps only
/// microseconds, so such a value cannot arrive exactly.
fn sub_microsecond(text: &str) -> bool {
    let Some(colon) = text.rfind(':') else { return false };
    let rest = &text[colon..];
    let Some(dot) = rest.find('.') else { return false };
    let digits: Vec<u8> = rest[dot + 1..].bytes().take_while(u8::is_ascii_digit).collect();
    digits.len() > 6 && digits[6..].iter().any(|&d| d != b'0')
}

// ------------------------------------------------------------------------------------------
// Messages
// ------------------------------------------------------------------------------------------

/// Bytes as a Rust-like string literal body: UTF-8 kept, controls and invalid bytes escaped.
fn escape(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\0' => out.push_str("\\0"),
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\u{feff}' => out.push_str("\\u{feff}"),
                c if c.is_control() => write!(out, "\\u{{{:x}}}", c as u32).unwrap(),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            write!(out, "\\x{b:02x}").unwrap();
        }
    }
    out
}

/// The file's bytes, escaped, the middle of a long one elided.
fn show_bytes(bytes: &[u8]) -> String {
    if bytes.len() <= 600 {
        return format!("b\"{}\"", escape(bytes));
    }
    format!(
        "b\"{}\" ... ({} bytes elided) ... b\"{}\"",
        escape(&bytes[..400]),
        bytes.len() - 500,
        escape(&bytes[bytes.len() - 100..])
    )
}

fn show_cell(cell: &Option<String>) -> String {
    match cell {
        None => "NULL".into(),
        Some(s) if s.len() > 120 => format!("\"{}…\" ({} bytes)", escape(&s.as_bytes()[..100]), s.len()),
        Some(s) => format!("\"{}\"", escape(s.as_bytes())),
    }
}

fn show_row(row: &[Option<String>]) -> String {
    format!("[{}]", row.iter().map(show_cell).collect::<Vec<_>>().join(", "))
}

/// Rows of `a` not in `b`, as multisets.
fn only_in(a: &Rows, b: &Rows) -> Rows {
    let mut rest: Vec<&Vec<Option<String>>> = b.iter().collect();
    let mut out = Vec::new();
    for row in a {
        match rest.iter().position(|r| *r == row) {
            Some(i) => drop(rest.swap_remove(i)),
            None => out.push(row.clone()),
        }
    }
    out
}

/// Says which rows differ between two multisets (`left`/`right` name the sides) and, when
/// as many rows differ on each side, which cells (pairing those rows in sorted order).
fn rows_diff(columns: &[&str], left: &str, a: &Rows, right: &str, b: &Rows) -> String {
    let mut s = String::new();
    let (left_only, right_only) = (only_in(a, b), only_in(b, a));
    for (name, rows) in [(left, &left_only), (right, &right_only)] {
        if !rows.is_empty() {
            writeln!(s, "      rows only in {name} ({}):", rows.len()).unwrap();
            for r in rows.iter().take(6) {
                writeln!(s, "        {}", show_row(r)).unwrap();
            }
        }
    }
    if left_only.len() == right_only.len() {
        for (x, y) in left_only.iter().zip(&right_only).take(6) {
            let cells: Vec<String> = x
                .iter()
                .zip(y.iter())
                .enumerate()
                .filter(|(_, (p, q))| p != q)
                .map(|(i, (p, q))| {
                    let column = columns.get(i).copied().unwrap_or("?");
                    format!("{column}: {} ≠ {}", show_cell(p), show_cell(q))
                })
                .collect();
            if !cells.is_empty() {
                writeln!(s, "      differing cells ({left} ≠ {right}): {}", cells.join("; ")).unwrap();
            }
        }
    }
    s
}

/// Problems, grouped by cause.
#[derive(Debug, Default, Clone)]
struct Problems(BTreeMap<String, Vec<String>>);

impl Problems {
    fn add(&mut self, cause: impl Into<String>, detail: impl Into<String>) {
        self.0.entry(cause.into()).or_default().push(detail.into());
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every cause with its count, then up to `per_cause` examples of each.
    fn report(&self, per_cause: usize) -> String {
        let mut s = String::new();
        for (cause, details) in &self.0 {
            writeln!(s, "  {:>4} × {cause}", details.len()).unwrap();
        }
        for (cause, details) in &self.0 {
            writeln!(s, "\n=== {cause} ({} files)", details.len()).unwrap();
            for d in details.iter().take(per_cause) {
                writeln!(s, "{d}").unwrap();
            }
            if details.len() > per_cause {
                writeln!(s, "  ... and {} more", details.len() - per_cause).unwrap();
            }
        }
        s
    }
}

fn describe_file(f: &Generated) -> String {
    format!(
        "  {} [{}]\n    bytes ({}): {}\n",
        f.key,
        f.features.join("; "),
        f.bytes.len(),
        show_bytes(&f.bytes)
    )
}

// ------------------------------------------------------------------------------------------
// The campaign: generate, load into every sink, COPY into the oracle, compare
// ------------------------------------------------------------------------------------------

struct Findings {
    summary: String,
    /// Sinks disagreeing, failures without a report or with rows left behind.
    agreement: Problems,
    /// PostgreSQL sinks disagreeing with COPY.
    oracle: Problems,
}

static CAMPAIGN: tokio::sync::OnceCell<Findings> = tokio::sync::OnceCell::const_new();

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Runs once per test binary; both differential tests read its findings.
async fn campaign() -> &'static Findings {
    CAMPAIGN.get_or_init(run_campaign).await
}

async fn run_campaign() -> Findings {
    let started = std::time::Instant::now();
    let seed = env_or("FIDELITY_SEED", DEFAULT_SEED);
    let mut files = generate(seed, env_or("FIDELITY_FILES", DEFAULT_FILES));
    let corpus = corpus_files();
    let corpus_count = corpus.len();
    files.extend(corpus);
    let routes = routes_toml(&files);
    let (sinks, oracle_db) = tokio::join!(Sink::create_all("fid_gen"), PgDb::create("fid_oracle"));
    let inputs: Vec<(&str, &[u8])> = files.iter().map(|f| (f.key.as_str(), f.bytes.as_slice())).collect();
    for s in &sinks {
        s.write(&inputs, &routes);
    }
    // The four loaders run at once (each is its own process); COPY reads meanwhile.
    let runs = futures_util::future::join_all(sinks.iter().map(Sink::run_once));
    let oracle = async {
        let mut out = Vec::with_capacity(files.len());
        for f in &files {
            out.push(oracle_read(&oracle_db.pool, f).await);
        }
        out
    };
    let (runs, oracle) = tokio::join!(runs, oracle);

    let mut agreement = Problems::default();
    let mut oracle_problems = Problems::default();
    // A sink whose loader did not run at all is reported once, not once per file.
    let mut live = Vec::new();
    for (sink, output) in sinks.iter().zip(&runs) {
        if !files.is_empty() && files.iter().all(|f| sink.outcome(&f.key) == Outcome::Stuck) {
            agreement.add(
                format!("{}: the loader loaded nothing", sink.name()),
                format!("  every file is still in incoming/; its output:\n{output}"),
            );
        } else {
            live.push(sink);
        }
    }

    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    let mut oracle_tally: BTreeMap<String, usize> = BTreeMap::new();
    for (f, oracle) in files.iter().zip(&oracle) {
        let mut seen = Vec::new();
        for sink in &live {
            let outcome = sink.outcome(&f.key);
            let table = sink.table(&f.table).await;
            seen.push((*sink, outcome, table));
        }
        check_agreement(f, oracle, &seen, &mut agreement, &mut tally);
        match oracle {
            Oracle::Excluded(why) => *oracle_tally.entry(format!("excluded: {why}")).or_default() += 1,
            Oracle::Refused(_) => *oracle_tally.entry("refused by COPY".into()).or_default() += 1,
            Oracle::Accepted(rows) => {
                *oracle_tally.entry("accepted by COPY, compared".into()).or_default() += 1;
                for (sink, outcome, table) in &seen {
                    if matches!(sink.kind, SinkKind::Postgres | SinkKind::PostgresParser) {
                        check_oracle(
                            &oracle_db.pool,
                            f,
                            sink,
                            outcome,
                            table.as_ref(),
                            rows,
                            &mut oracle_problems,
                        )
                        .await;
                    }
                }
            }
        }
    }
    let mut summary = format!(
        "{} generated files (seed {seed:#x}) and {corpus_count} corpus files, {} sinks, {:.1?}\n",
        files.len() - corpus_count,
        live.len(),
        started.elapsed()
    );
    for (what, n) in tally.iter().chain(&oracle_tally) {
        writeln!(summary, "  {n:>4}  {what}").unwrap();
    }
    eprintln!("{summary}");
    Findings {
        summary,
        agreement,
        oracle: oracle_problems,
    }
}

/// Files gathered from other projects' test suites and examples (CSV and TSV), from
/// `$FIDELITY_CORPUS` or else the shared folder beside the repository (`../shared/corpus`), each
/// with a README saying where it comes from. They run through every sink and the oracle like
/// the generated ones; none is stored in this repository.
fn corpus_files() -> Vec<Generated> {
    let dir = std::env::var_os("FIDELITY_CORPUS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus"));
    let mut paths = Vec::new();
    let mut stack = vec![dir];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if matches!(path.extension().and_then(|x| x.to_str()), Some("csv" | "tsv")) {
                paths.push(path);
            }
        }
    }
    paths.sort();
    paths
        .iter()
        .enumerate()
        .filter_map(|(i, path)| {
            let bytes = std::fs::read(path).ok()?;
            let tsv = path.extension().is_some_and(|x| x == "tsv");
            let delimiter = if tsv { b'\t' } else { b',' };
            let table = format!("c{:04}", i + 1);
            let name = if tsv { "x.tsv" } else { "x.csv" };
            Some(Generated {
                key: format!("{table}/{name}"),
                table,
                delimiter,
                width: header_width(&bytes, delimiter),
                bytes,
                features: vec![format!("corpus: {}", path.display())],
            })
        })
        .collect()
}

/// Fields in the first record (quotes respected), for the oracle's table of text columns.
fn header_width(bytes: &[u8], delimiter: u8) -> usize {
    let (mut fields, mut quoted) = (1, false);
    for &b in bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes) {
        match b {
            b'"' => quoted = !quoted,
            b'\n' | b'\r' if !quoted => break,
            b if b == delimiter && !quoted => fields += 1,
            _ => {}
        }
    }
    fields
}

/// Every sink failed the file (with a report, no rows) or every sink loaded it, equally.
fn check_agreement(
    f: &Generated,
    oracle: &Oracle,
    seen: &[(&Sink, Outcome, Option<Table>)],
    problems: &mut Problems,
    tally: &mut BTreeMap<String, usize>,
) {
    if seen.is_empty() {
        return;
    }
    let all_loaded = seen.iter().all(|(_, o, _)| *o == Outcome::Loaded);
    let all_failed = seen.iter().all(|(_, o, _)| matches!(o, Outcome::Failed(_)));
    let outcomes = || {
        let mut s = match oracle {
            Oracle::Excluded(why) => format!("    {:<23} not compared: {why}\n", "COPY"),
            Oracle::Refused(why) => format!("    {:<23} refuses: {why}\n", "COPY"),
            Oracle::Accepted(rows) => format!("    {:<23} accepts: {} rows\n", "COPY", rows.len()),
        };
        for (sink, outcome, table) in seen {
            let rows = table
                .as_ref()
                .map_or("no table".to_string(), |t| format!("{} rows", t.rows.len()));
            writeln!(s, "    {:<23} {outcome} [{rows}]", sink.name()).unwrap();
        }
        s
    };
    for (sink, outcome, _) in seen {
        if matches!(outcome, Outcome::Stuck | Outcome::Vanished) {
            problems.add(
                format!("left in incoming/ (or lost) by {}", sink.name()),
                format!("{}{}", describe_file(f), outcomes()),
            );
        }
    }
    if all_failed {
        *tally.entry("failed in every sink".into()).or_default() += 1;
        for (sink, outcome, table) in seen {
            if *outcome == Outcome::Failed(None) {
                problems.add(format!("failed without a report in {}", sink.name()), describe_file(f));
            }
            if let Some(t) = table.as_ref().filter(|t| !t.rows.is_empty()) {
                problems.add(
                    format!("failed but left rows in {}", sink.name()),
                    format!("{}    {} rows left\n", describe_file(f), t.rows.len()),
                );
            }
        }
        return;
    }
    if !all_loaded {
        *tally
            .entry("loaded by some sinks, failed by others".into())
            .or_default() += 1;
        let loaded: Vec<&str> = seen
            .iter()
            .filter(|(_, o, _)| *o == Outcome::Loaded)
            .map(|(s, _, _)| s.name())
            .collect();
        problems.add(
            format!("sinks disagree: loaded only by [{}]", loaded.join(", ")),
            format!("{}{}", describe_file(f), outcomes()),
        );
        return;
    }
    *tally.entry("loaded in every sink".into()).or_default() += 1;
    // Equal contents: a missing table (header only) counts as an empty one of unknown columns.
    let (reference, _, ref_table) = &seen[0];
    let empty = Table::default();
    let ref_table = ref_table.as_ref().unwrap_or(&empty);
    let ref_rows = ref_table.canonical();
    for (sink, _, table) in &seen[1..] {
        let table = table.as_ref().unwrap_or(&empty);
        let rows = table.canonical();
        let names_differ =
            !table.columns.is_empty() && !ref_table.columns.is_empty() && table.names() != ref_table.names();
        if rows == ref_rows && !names_differ {
            continue;
        }
        let mut detail = describe_file(f);
        writeln!(
            detail,
            "    {:<23} columns ({})\n    {:<23} columns ({})",
            reference.name(),
            ref_table.describe_columns(),
            sink.name(),
            table.describe_columns()
        )
        .unwrap();
        let columns = if ref_table.columns.is_empty() {
            table.names()
        } else {
            ref_table.names()
        };
        detail.push_str(&rows_diff(&columns, reference.name(), &ref_rows, sink.name(), &rows));
        problems.add(
            format!("contents differ: {} vs {}", reference.name(), sink.name()),
            detail,
        );
    }
}

/// COPY accepted the file: the PostgreSQL sink must have loaded it, each cell's text being
/// COPY's (timestamps compared as values of the column's type, and none may lose digits).
async fn check_oracle(
    pool: &sqlx::PgPool,
    f: &Generated,
    sink: &Sink,
    outcome: &Outcome,
    table: Option<&Table>,
    copy_rows: &Rows,
    problems: &mut Problems,
) {
    if *outcome != Outcome::Loaded {
        problems.add(
            format!("COPY accepts the file, {} did not load it", sink.name()),
            format!(
                "{}    {:<23} {outcome}\n    COPY read {} rows\n",
                describe_file(f),
                sink.name(),
                copy_rows.len()
            ),
        );
        return;
    }
    let Some(table) = table else {
        if !copy_rows.is_empty() {
            problems.add(
                format!("COPY reads rows, {} loaded no table", sink.name()),
                format!("{}    COPY read {} rows\n", describe_file(f), copy_rows.len()),
            );
        }
        return;
    };
    if table.columns.len() != f.width {
        problems.add(
            format!("{} loaded a different number of columns than COPY", sink.name()),
            format!(
                "{}    {} columns ({}), COPY {}\n",
                describe_file(f),
                sink.name(),
                table.describe_columns(),
                f.width
            ),
        );
        return;
    }
    // COPY's cells, with those of timestamp columns spelled as PostgreSQL spells the type.
    let mut expected = copy_rows.clone();
    for (j, (name, class, _)) in table.columns.iter().enumerate() {
        if !matches!(class, Class::Timestamp | Class::TimestampTz) {
            continue;
        }
        let texts: Vec<Option<String>> = copy_rows.iter().map(|r| r[j].clone()).collect();
        let lossy: Vec<&String> = texts.iter().flatten().filter(|t| sub_microsecond(t)).collect();
        if !lossy.is_empty() {
            problems.add(
                format!(
                    "{} made a timestamp column of values with sub-microsecond digits",
                    sink.name()
                ),
                format!(
                    "{}    column {name} ({}) cannot hold exactly: {}\n",
                    describe_file(f),
                    table.columns[j].2,
                    lossy.iter().map(|t| format!("{t:?}")).collect::<Vec<_>>().join(", ")
                ),
            );
        }
        if let Some(cast) = as_pg_timestamps(pool, texts, *class).await {
            for (row, v) in expected.iter_mut().zip(cast) {
                row[j] = v;
            }
        }
    }
    expected.sort();
    let mut loaded = table.rows.clone();
    loaded.sort();
    if loaded != expected {
        let mut detail = describe_file(f);
        writeln!(detail, "    {} columns ({})", sink.name(), table.describe_columns()).unwrap();
        detail.push_str(&rows_diff(&table.names(), "COPY", &expected, sink.name(), &loaded));
        problems.add(format!("{} differs from COPY's reading", sink.name()), detail);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_generated_file_loads_the_same_in_every_sink_or_fails_in_all() {
    let findings = campaign().await;
    assert!(
        findings.agreement.is_empty(),
        "{}\nproblems by cause:\n{}",
        findings.summary,
        findings.agreement.report(4)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_generated_file_copy_accepts_is_loaded_into_postgres_exactly_as_copy_reads_it() {
    let findings = campaign().await;
    assert!(
        findings.oracle.is_empty(),
        "{}\nproblems by cause:\n{}",
        findings.summary,
        findings.oracle.report(4)
    );
}

#[test]
fn the_generator_is_deterministic_and_covers_every_feature() {
    let a = generate(DEFAULT_SEED, DEFAULT_FILES);
    let b = generate(DEFAULT_SEED, DEFAULT_FILES);
    assert!(a.iter().zip(&b).all(|(x, y)| x.bytes == y.bytes && x.key == y.key));
    let features: Vec<&str> = a.iter().flat_map(|f| f.features.iter().map(String::as_str)).collect();
    for wanted in [
        "a 100 KB field",
        "a NUL byte",
        "invalid UTF-8 split across two fields",
        "a quote inside an unquoted field",
        "a bad first row",
        "a ragged row",
        "a line holding only \\.",
        "a blank first line",
        "a blank line",
        "a blank last line",
        "CRLF",
        "bare CR",
        "mixed line ends",
        "a BOM",
        "header only",
        "no final line end",
    ] {
        assert!(features.contains(&wanted), "no generated file has {wanted:?}");
    }
    for delimiter in [",", "\\t", ";", "|"] {
        assert!(
            features.iter().any(|f| *f == format!("delimiter '{delimiter}'")),
            "no file with delimiter {delimiter}"
        );
    }
    let all: Vec<u8> = a.iter().flat_map(|f| f.bytes.clone()).collect();
    for needle in [
        &b"007"[..],
        b"08123",
        b"129.90",
        b"1E2",
        b"1-02-03",
        b"9223372036854775808",
        b"9999-12-31T23:59:59.9999999Z",
        b"TRUE",
        b"\"\"",
    ] {
        assert!(
            all.windows(needle.len()).any(|w| w == needle),
            "no generated file holds {}",
            escape(needle)
        );
    }
}

#[test]
fn the_oracle_exclusions_name_what_copy_reads_differently() {
    assert_eq!(oracle_exclusion(b"a,b\n1,2\n", b','), None);
    assert_eq!(oracle_exclusion(b"a,b\r\n\"x\r\n\r\ny\",2\r\n", b','), None);
    assert_eq!(oracle_exclusion(b"a\n\"\"\n", b','), None);
    assert!(oracle_exclusion(b"\na,b\n", b',').unwrap().contains("blank first line"));
    assert!(oracle_exclusion(b"a\n1\n\n2\n", b',').unwrap().contains("blank line"));
    assert!(
        oracle_exclusion(b"a\r\n1\r\n\r\n", b',')
            .unwrap()
            .contains("blank line")
    );
    assert!(oracle_exclusion(b"a\n\\.\n2\n", b',').unwrap().contains("\\."));
    assert!(oracle_exclusion(b"\xEF\xBB\xBFa\n1\n", b',').unwrap().contains("BOM"));
    assert!(
        oracle_exclusion(b"a,b\n5\" disk,x\n", b',')
            .unwrap()
            .contains("quote inside")
    );
    assert!(
        oracle_exclusion(b"a,b\n\"x\"y,z\n", b',')
            .unwrap()
            .contains("after a closing quote")
    );
    assert!(sub_microsecond("9999-12-31T23:59:59.9999999Z"));
    assert!(!sub_microsecond("2026-01-01 10:00:00.1234560"));
    assert!(!sub_microsecond("2026-01-01 10:00:00+02:00"));
    assert_eq!(
        canonical_timestamp("2026-01-01T10:00:00.500+02:00"),
        "2026-01-01 08:00:00.5"
    );
    assert_eq!(canonical_timestamp("2026-01-01 10:00:00.000000"), "2026-01-01 10:00:00");
    assert_eq!(
        canonical_timestamp("10000-01-01 00:00:00.000000"),
        "10000-01-01 00:00:00"
    );
}

// ------------------------------------------------------------------------------------------
// Hand-written cases: the known defects, each against every sink
// ------------------------------------------------------------------------------------------

enum Expect<'a> {
    /// In `failed/` with a report, and no rows.
    Fails,
    /// In `processed/`, the table with these columns and exactly these rows (any order),
    /// each cell read back as text.
    Loads {
        columns: &'a [&'a str],
        rows: &'a [&'a [Option<&'a str>]],
    },
}

async fn check_case(test: &str, key: &str, bytes: &[u8], expect: Expect<'_>) {
    let sinks = Sink::create_all(test).await;
    for s in &sinks {
        s.write(&[(key, bytes)], "");
    }
    let runs = futures_util::future::join_all(sinks.iter().map(Sink::run_once)).await;
    let table = key.split('/').next().unwrap();
    let mut problems = String::new();
    for (sink, output) in sinks.iter().zip(&runs) {
        let outcome = sink.outcome(key);
        let loaded = sink.table(table).await;
        let mut wrong = |what: String| {
            writeln!(problems, "  {:<23} {what}", sink.name()).unwrap();
            if outcome == Outcome::Stuck {
                // The end of the loader's output says why (a panic, a configuration error).
                let lines: Vec<&str> = output.trim().lines().collect();
                let tail = lines[lines.len().saturating_sub(12)..].join("\n      ");
                writeln!(problems, "    loader output (end):\n      {tail}").unwrap();
            }
        };
        match &expect {
            Expect::Fails => {
                match &outcome {
                    Outcome::Failed(Some(_)) => {}
                    other => wrong(format!("should fail with a report, but: {other}")),
                }
                if let Some(t) = loaded.as_ref().filter(|t| !t.rows.is_empty()) {
                    wrong(format!(
                        "left {} rows: {}",
                        t.rows.len(),
                        t.rows.iter().map(|r| show_row(r)).collect::<Vec<_>>().join(" ")
                    ));
                }
            }
            Expect::Loads { columns, rows } => {
                if outcome != Outcome::Loaded {
                    wrong(format!("should load, but: {outcome}"));
                    continue;
                }
                let Some(t) = loaded else {
                    wrong("loaded, but there is no table".into());
                    continue;
                };
                if t.names() != *columns {
                    wrong(format!("columns ({}), want {columns:?}", t.describe_columns()));
                }
                let mut want: Rows = rows
                    .iter()
                    .map(|r| r.iter().map(|c| c.map(str::to_string)).collect())
                    .collect();
                want.sort();
                let mut got = t.rows.clone();
                got.sort();
                if got != want {
                    wrong(format!(
                        "columns ({}) hold {}, want {}",
                        t.describe_columns(),
                        got.iter().map(|r| show_row(r)).collect::<Vec<_>>().join(" "),
                        want.iter().map(|r| show_row(r)).collect::<Vec<_>>().join(" ")
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{key} {}:\n{problems}", show_bytes(bytes));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_first_data_row_fails_the_whole_file_in_every_sink() {
    check_case("fid_bad_first", "t/x.csv", b"a,b\n1,2,3\n4,5\n", Expect::Fails).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blank_first_line_is_skipped_and_the_header_read_from_the_next_line() {
    check_case(
        "fid_blank_first",
        "t/x.csv",
        b"\na,b\nx,y\n",
        Expect::Loads {
            columns: &["a", "b"],
            rows: &[&[Some("x"), Some("y")]],
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tsv_field_holding_a_comma_stays_one_field() {
    check_case(
        "fid_tsv_comma",
        "t/x.tsv",
        b"a\tb\nhello, world\tfoo\n",
        Expect::Loads {
            columns: &["a", "b"],
            rows: &[&[Some("hello, world"), Some("foo")]],
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn numbers_with_leading_zeros_keep_their_zeros() {
    check_case(
        "fid_leading_zeros",
        "t/x.csv",
        b"zip\n08123\n007\n",
        Expect::Loads {
            columns: &["zip"],
            rows: &[&[Some("08123")], &[Some("007")]],
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dates_not_in_iso_form_stay_text_as_written() {
    check_case(
        "fid_non_iso_dates",
        "t/x.csv",
        b"d\n1-02-03\n5-6-7\n",
        Expect::Loads {
            columns: &["d"],
            rows: &[&[Some("1-02-03")], &[Some("5-6-7")]],
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_integer_beyond_64_bits_keeps_every_digit() {
    check_case(
        "fid_big_integer",
        "t/x.csv",
        b"n\n12345678901234567890\n",
        Expect::Loads {
            columns: &["n"],
            rows: &[&[Some("12345678901234567890")]],
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn decimals_keep_their_trailing_zeros() {
    check_case(
        "fid_decimals",
        "t/x.csv",
        b"amount\n129.90\n2400.00\n",
        Expect::Loads {
            columns: &["amount"],
            rows: &[&[Some("129.90")], &[Some("2400.00")]],
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_utf8_split_across_two_fields_fails_the_whole_file() {
    check_case("fid_split_utf8", "t/x.csv", b"a,b\n\xc3,\xa9\n", Expect::Fails).await;
}

/// Issue: the types of a new table depended on which worker won the race to create it. Now
/// the first file by key order creates it and the others wait. `a.csv` is large (slow) and
/// sorts first; without that rule a tiny `b.csv` or `c.csv` would create the table first (as
/// decimal or text) and every file would load.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_tables_types_come_from_its_first_file_by_key_order_whoever_is_faster() {
    for round in 0..3 {
        let db = PgDb::create(&format!("first_key_{round}")).await;
        let dir = tempfile::tempdir().unwrap();
        let incoming = dir.path().join("data/incoming");
        let mut big = String::from("amount\n");
        for i in 0..200_000 {
            big.push_str(&format!("{i}\n"));
        }
        write_old(&incoming.join("t/a.csv"), big.as_bytes());
        write_old(&incoming.join("t/b.csv"), b"amount\n1.5\n");
        write_old(&incoming.join("t/c.csv"), b"amount\nx\n");
        let env = kv(&[
            ("LOADER_DATABASE__URL", db.url.as_str()),
            ("LOADER_WORKERS__CONCURRENCY", "4"),
        ]);
        let (status, stdout, stderr) = run(dir.path(), &["once"], &env);
        assert_eq!(status.code(), Some(1), "b and c fail\n{stdout}{stderr}");
        assert_eq!(
            files_under(&dir.path().join("data/processed")),
            ["t/a.csv"],
            "round {round}\n{stdout}"
        );
        assert_eq!(
            files_under(&dir.path().join("data/failed")),
            ["t/b.csv", "t/b.csv.error.json", "t/c.csv", "t/c.csv.error.json"],
            "round {round}"
        );
        let ty: (String,) = sqlx::query_as(
            "SELECT data_type::text FROM information_schema.columns WHERE table_name = 't' AND column_name = 'amount'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(ty.0, "bigint", "round {round}");
        assert_eq!(db.count("SELECT count(*) FROM t").await, 200_000);
    }
}

/// PostgreSQL's own `COPY ... TO ... (FORMAT csv, HEADER)` writes a NULL of a one-column table
/// as a blank line; COPY reads it back as a row. The loader must not drop it.
#[tokio::test(flavor = "multi_thread")]
async fn a_blank_line_in_a_one_column_file_is_a_null_row_as_copy_reads_it() {
    check_case(
        "fid_blank_row",
        "t/x.csv",
        b"email\r\na@x\r\n\r\nb@y\r\n",
        Expect::Loads {
            columns: &["email"],
            rows: &[&[Some("a@x")], &[None], &[Some("b@y")]],
        },
    )
    .await;
}

/// Values PostgreSQL would read its own way: a leap second (the next minute) and an offset
/// beyond ±15:59 (refused): not timestamps, so the column stays text and keeps them.
#[tokio::test(flavor = "multi_thread")]
async fn leap_seconds_and_impossible_offsets_stay_text_as_written() {
    check_case(
        "fid_leap",
        "t/x.csv",
        b"a,b\n2026-12-31 23:59:60,2026-11-01T10:00:00+16:00\n",
        Expect::Loads {
            columns: &["a", "b"],
            rows: &[&[Some("2026-12-31 23:59:60"), Some("2026-11-01T10:00:00+16:00")]],
        },
    )
    .await;
}

/// A JSON column keeps each value as the line wrote it: no merged duplicate keys, no
/// rewritten numbers (PostgreSQL `json`, not `jsonb`).
#[tokio::test(flavor = "multi_thread")]
async fn json_values_are_stored_as_the_line_wrote_them() {
    check_case(
        "fid_json",
        "t/x.jsonl",
        b"{\"j\": {\"a\":1,\"a\":2,\"n\":1E2}, \"n\": 1.10}\n",
        Expect::Loads {
            columns: &["j", "n"],
            rows: &[&[Some("{\"a\":1,\"a\":2,\"n\":1E2}"), Some("1.10")]],
        },
    )
    .await;
}

/// Into an existing PostgreSQL table, a value its declared precision or length would round,
/// cut or pad fails the file; values within them load.
#[tokio::test(flavor = "multi_thread")]
async fn declared_precision_and_length_of_an_existing_postgres_table_are_never_rounded_away() {
    for passthrough in ["true", "false"] {
        let db = PgDb::create(&format!("fid_limits_{passthrough}")).await;
        sqlx::query("CREATE TABLE t (amount numeric(10,2), ts timestamp(0), code varchar(3), c char(2))")
            .execute(&db.pool)
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let incoming = dir.path().join("data/incoming/t");
        write_old(
            &incoming.join("a-good.csv"),
            b"amount,ts,code,c\n1.5,2026-11-01 10:00:00,abc,xy\n",
        );
        write_old(&incoming.join("b-scale.csv"), b"amount\n1.005\n");
        write_old(&incoming.join("c-seconds.csv"), b"ts\n2026-11-01 10:00:00.7\n");
        write_old(&incoming.join("d-spaces.csv"), b"code\n\"ab  \"\n");
        write_old(&incoming.join("e-pad.csv"), b"c\nx\n");
        let env = kv(&[
            ("LOADER_DATABASE__URL", db.url.as_str()),
            ("LOADER_DATABASE__PASSTHROUGH", passthrough),
        ]);
        let (_, stdout, stderr) = run(dir.path(), &["once"], &env);
        assert_eq!(
            files_under(&dir.path().join("data/failed")),
            [
                "t/b-scale.csv",
                "t/b-scale.csv.error.json",
                "t/c-seconds.csv",
                "t/c-seconds.csv.error.json",
                "t/d-spaces.csv",
                "t/d-spaces.csv.error.json",
                "t/e-pad.csv",
                "t/e-pad.csv.error.json"
            ],
            "passthrough {passthrough}\n{stdout}{stderr}"
        );
        for f in ["b-scale", "c-seconds", "d-spaces", "e-pad"] {
            let report = std::fs::read_to_string(dir.path().join(format!("data/failed/t/{f}.csv.error.json"))).unwrap();
            assert!(
                report.contains("\"kind\": \"type\"") || report.contains("\"kind\":\"type\""),
                "{report}"
            );
        }
        assert_eq!(db.count("SELECT count(*) FROM t").await, 1);
        assert_eq!(
            db.count("SELECT count(*) FROM t WHERE amount = 1.5 AND code = 'abc'")
                .await,
            1
        );
    }
}

/// Into an existing SQLite table whose declared type gives a column NUMERIC affinity
/// (`DECIMAL(10,2)`, `STRING`), SQLite would turn `1.10` into 1.1 and `08123` into 8123: such
/// a value fails the file; integers and other text load as written.
#[tokio::test(flavor = "multi_thread")]
async fn sqlite_columns_that_would_turn_text_into_numbers_refuse_such_values() {
    let dir = tempfile::tempdir().unwrap();
    let db = AnyDb::sqlite(dir.path()).await;
    if let AnyDb::Sqlite { pool, .. } = &db {
        sqlx::query("CREATE TABLE t (amount DECIMAL(10,2), zip STRING)")
            .execute(pool)
            .await
            .unwrap();
    }
    let incoming = dir.path().join("data/incoming/t");
    write_old(&incoming.join("a-good.csv"), b"amount,zip\n5,x-1\n");
    write_old(&incoming.join("b-decimal.csv"), b"amount\n1.10\n");
    write_old(&incoming.join("c-zip.csv"), b"zip\n08123\n");
    let env = kv(&[("LOADER_DATABASE__URL", db.url())]);
    let (_, stdout, stderr) = run(dir.path(), &["once"], &env);
    assert_eq!(
        files_under(&dir.path().join("data/failed")),
        [
            "t/b-decimal.csv",
            "t/b-decimal.csv.error.json",
            "t/c-zip.csv",
            "t/c-zip.csv.error.json"
        ],
        "{stdout}{stderr}"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM t").await, 1);
    assert_eq!(db.text("SELECT zip FROM t").await.as_deref(), Some("x-1"));
}

/// MariaDB: upsert keys compare byte for byte (`abc` and `ABC` are two rows, as in PostgreSQL
/// and SQLite), and a table created for timestamps with offsets takes a second such file.
#[tokio::test(flavor = "multi_thread")]
async fn mariadb_keeps_case_distinct_keys_apart_and_offset_timestamps_load_file_after_file() {
    let db = MyDb::create("fid_my_keys").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("routes.toml"),
        "[[routes]]\nprefix = \"t/\"\nwrite_mode = \"upsert\"\nkey_columns = [\"k\"]\n",
    )
    .unwrap();
    let env = kv(&[
        ("LOADER_DATABASE__URL", db.url.as_str()),
        ("LOADER_CONFIG", "routes.toml"),
    ]);
    let incoming = dir.path().join("data/incoming/t");
    write_old(
        &incoming.join("a.csv"),
        b"k,v,ts\nabc,1,2026-11-01T10:00:00+02:00\nABC,2,2026-11-01T10:00:00Z\n",
    );
    let (status, stdout, stderr) = run(dir.path(), &["once"], &env);
    assert!(status.success(), "{stdout}{stderr}");
    write_old(&incoming.join("b.csv"), b"k,v,ts\nabd,3,2026-11-02T10:00:00+01:00\n");
    let (status, stdout, stderr) = run(dir.path(), &["once"], &env);
    assert!(status.success(), "{stdout}{stderr}");
    assert_eq!(db.count("SELECT count(*) FROM t").await, 3);
    assert_eq!(db.count("SELECT count(*) FROM t WHERE k = 'ABC' AND v = 2").await, 1);
    assert_eq!(
        db.count("SELECT count(*) FROM t WHERE ts = '2026-11-02 09:00:00'")
            .await,
        1,
        "the offset, turned into UTC"
    );
}
