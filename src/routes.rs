//! Which table, format and load options each file gets. `[[routes]]` in the configuration map a
//! key prefix or a glob (relative to `incoming/`) to a table, a format with its options, a write
//! mode and schema rules; the first route that matches wins. A file no route matches loads into
//! the table named by its first folder, as CSV with the `[csv]` options.

use globset::{Glob, GlobMatcher};
use serde::Deserialize;

use crate::config::Config;
use crate::error::{FileError, FileErrorKind};
use crate::format::{Format, FormatOptions};
use crate::schema;

/// One `[[routes]]` entry, as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Applies to keys (relative to `incoming/`) starting with this, e.g. `"orders/"`.
    pub prefix: Option<String>,
    /// Or to keys matching this glob: `*` within a folder, `**` across folders, e.g.
    /// `"events/**/*.jsonl.gz"`.
    pub glob: Option<String>,
    /// Target table; default: the key's first folder.
    pub table: Option<String>,
    /// `csv`, `tsv` or `jsonl`; default: by the file's extension.
    pub format: Option<Format>,
    /// CSV options; default: the `[csv]` section's.
    pub delimiter: Option<String>,
    pub quote: Option<String>,
    pub null: Option<String>,
    /// Whether the first CSV line is a header; without one, `columns` names the columns.
    pub header: Option<bool>,
    #[serde(default)]
    pub columns: Vec<String>,
    /// `append` (default) or `upsert` (insert, or update the row with the same `key_columns`).
    #[serde(default)]
    pub write_mode: WriteMode,
    #[serde(default)]
    pub key_columns: Vec<String>,
    /// A column of the file missing from the table: `fail` (default) or `add` it.
    #[serde(default)]
    pub on_new_columns: NewColumns,
    /// A column of the table missing from the file: `null` (default: it gets NULL or its
    /// default) or `fail`.
    #[serde(default)]
    pub on_missing_columns: MissingColumns,
    /// Add lineage columns `_source_key`, `_etag`, `_loaded_at`, `_line` to every row.
    #[serde(default)]
    pub metadata_columns: bool,
    /// Overrides `database.create_tables` for this route.
    pub create_tables: Option<bool>,
    /// Overrides `database.infer_types` for this route: `false` makes every new column text.
    pub infer_types: Option<bool>,
    /// Declared types of new columns, by column name (`zip = "text"`, `amount = "numeric"`),
    /// over whatever inference would choose. Accepted: integer, numeric (decimal), float,
    /// boolean, date, timestamp, timestamptz, text, json.
    #[serde(default)]
    pub column_types: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteMode {
    #[default]
    Append,
    Upsert,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NewColumns {
    #[default]
    Fail,
    Add,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MissingColumns {
    #[default]
    Null,
    Fail,
}

/// The lineage columns, in order.
pub const METADATA_COLUMNS: [&str; 4] = ["_source_key", "_etag", "_loaded_at", "_line"];

/// How one file is loaded.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The target table, or why there is none (the file then fails).
    pub table: Result<String, FileError>,
    pub format: FormatOptions,
    pub write_mode: WriteMode,
    pub key_columns: Vec<String>,
    pub on_new_columns: NewColumns,
    pub on_missing_columns: MissingColumns,
    pub metadata_columns: bool,
    pub create_tables: bool,
    /// Infer the types of new columns from the data (else every new column is text).
    pub infer_types: bool,
    /// Declared types of new columns, over inference.
    pub column_types: std::collections::BTreeMap<String, schema::ColumnType>,
    /// New columns widened by an earlier attempt of this load (see `sink::widened_spec`).
    pub widened: std::collections::BTreeMap<String, schema::ColumnType>,
}

struct Route {
    config: RouteConfig,
    glob: Option<GlobMatcher>,
}

/// The routes, compiled.
pub struct Routes {
    routes: Vec<Route>,
    defaults: FormatOptions,
    create_tables: bool,
    infer_types: bool,
    ledger_table: String,
}

fn one_byte(value: &Option<String>, default: u8) -> u8 {
    match value.as_deref().map(str::as_bytes) {
        Some([b]) => *b,
        _ => default,
    }
}

impl Routes {
    /// Every problem of every route, for [`Config::validated`].
    pub fn problems(routes: &[RouteConfig]) -> Vec<String> {
        let mut problems = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            let at = format!("routes[{i}]");
            match (&r.prefix, &r.glob) {
                (Some(_), Some(_)) | (None, None) => problems.push(format!("{at}: give exactly one of prefix or glob")),
                (_, Some(g)) => {
                    if let Err(e) = Glob::new(g) {
                        problems.push(format!("{at}.glob: {e}"));
                    }
                }
                _ => {}
            }
            if let Some(t) = r.table.as_ref().filter(|t| !schema::is_safe_identifier(t)) {
                problems.push(format!("{at}.table: {t:?} is not a safe SQL identifier"));
            }
            for (key, value) in [("delimiter", &r.delimiter), ("quote", &r.quote)] {
                if value
                    .as_ref()
                    .is_some_and(|v| !matches!(v.as_bytes(), [b] if b.is_ascii()))
                {
                    problems.push(format!("{at}.{key}: must be exactly one ASCII character"));
                }
            }
            if let Some(null) = &r.null {
                let delimiter =
                    r.delimiter
                        .as_deref()
                        .unwrap_or(if r.format == Some(Format::Tsv) { "\t" } else { "," });
                let quote = r.quote.as_deref().unwrap_or("\"");
                if [delimiter, quote, "\n", "\r"]
                    .iter()
                    .any(|c| !c.is_empty() && null.contains(c))
                {
                    problems.push(format!(
                        "{at}.null: must not contain the delimiter, the quote or a line end (COPY refuses such a NULL string)"
                    ));
                }
            }
            if r.header == Some(false) && r.columns.is_empty() {
                problems.push(format!("{at}.columns: needed when header = false"));
            }
            if r.write_mode == WriteMode::Upsert && r.key_columns.is_empty() {
                problems.push(format!("{at}.key_columns: needed when write_mode = \"upsert\""));
            }
            for (c, t) in &r.column_types {
                if !schema::is_safe_identifier(c) {
                    problems.push(format!("{at}.column_types: column {c:?} is not a safe SQL identifier"));
                }
                if schema::ColumnType::from_declared(t).is_none() {
                    problems.push(format!(
                        "{at}.column_types.{c}: {t:?} is not a type the loader knows (integer, numeric, float, boolean, date, timestamp, timestamptz, text, json)"
                    ));
                }
            }
            for c in r.columns.iter().chain(&r.key_columns) {
                if !schema::is_safe_identifier(c) {
                    problems.push(format!("{at}: column {c:?} is not a safe SQL identifier"));
                }
            }
        }
        problems
    }

    pub fn new(config: &Config) -> Routes {
        let defaults = FormatOptions {
            format: None,
            delimiter: config.csv_delimiter(),
            quote: config.csv_quote(),
            null: config.csv.null.clone(),
            header: true,
            columns: Vec::new(),
            limits: config.limits.input_limits(),
        };
        Routes {
            routes: config
                .routes
                .iter()
                .map(|r| Route {
                    glob: r
                        .glob
                        .as_deref()
                        .map(|g| Glob::new(g).expect("validated at load").compile_matcher()),
                    config: r.clone(),
                })
                .collect(),
            defaults,
            create_tables: config.database.create_tables,
            infer_types: config.database.infer_types,
            ledger_table: config.database.ledger_table.clone(),
        }
    }

    /// How to load the file at `key` (relative to `incoming/`).
    pub fn resolve(&self, key: &str) -> LoadSpec {
        let route = self.routes.iter().find(|r| match (&r.config.prefix, &r.glob) {
            (Some(p), _) => key.starts_with(p.as_str()),
            (None, Some(g)) => g.is_match(key),
            (None, None) => false,
        });
        let Some(Route { config: r, .. }) = route else {
            return LoadSpec {
                table: table_for_key(key, &self.ledger_table),
                format: self.defaults.clone().resolved(key),
                write_mode: WriteMode::Append,
                key_columns: Vec::new(),
                on_new_columns: NewColumns::Fail,
                on_missing_columns: MissingColumns::Null,
                metadata_columns: false,
                create_tables: self.create_tables,
                infer_types: self.infer_types,
                column_types: Default::default(),
                widened: Default::default(),
            };
        };
        let table = match &r.table {
            Some(t) => Ok(schema::normalize(t)),
            None => table_for_key(key, &self.ledger_table),
        };
        let resolved = r.format.unwrap_or_else(|| Format::from_key(key));
        let format = FormatOptions {
            format: Some(resolved),
            delimiter: one_byte(
                &r.delimiter,
                if resolved == Format::Tsv {
                    b'\t'
                } else {
                    self.defaults.delimiter
                },
            ),
            quote: one_byte(&r.quote, self.defaults.quote),
            null: r.null.clone().unwrap_or_else(|| self.defaults.null.clone()),
            header: r.header.unwrap_or(true),
            columns: r.columns.iter().map(|c| schema::normalize(c)).collect(),
            limits: self.defaults.limits,
        };
        LoadSpec {
            table,
            format,
            write_mode: r.write_mode,
            key_columns: r.key_columns.iter().map(|c| schema::normalize(c)).collect(),
            on_new_columns: r.on_new_columns,
            on_missing_columns: r.on_missing_columns,
            metadata_columns: r.metadata_columns,
            create_tables: r.create_tables.unwrap_or(self.create_tables),
            infer_types: r.infer_types.unwrap_or(self.infer_types),
            column_types: r
                .column_types
                .iter()
                .filter_map(|(c, t)| Some((schema::normalize(c), schema::ColumnType::from_declared(t)?)))
                .collect(),
            widened: Default::default(),
        }
    }
}

/// The target table for a relative key: its first folder (`orders/2026/a.csv` → `orders`), or
/// for a file directly in `incoming/` its name up to the first dot (`orders.csv.gz` → `orders`).
pub fn table_for_key(key: &str, ledger_table: &str) -> Result<String, FileError> {
    let raw = match key.split_once('/') {
        Some((folder, _)) => folder,
        None => key.split('.').next().unwrap_or(key),
    };
    if !schema::is_safe_identifier(raw) {
        return Err(FileError::new(
            FileErrorKind::UnsafeName,
            format!(
                "table name {raw:?} taken from the key is not a safe SQL identifier (letters, digits and _, not starting with a digit, at most 63 characters)"
            ),
        ));
    }
    let table = schema::normalize(raw);
    if table == schema::normalize(ledger_table) || table == format!("{}_claims", schema::normalize(ledger_table)) {
        return Err(FileError::new(
            FileErrorKind::UnsafeName,
            format!("table name {table:?} is the loader's own ledger table"),
        ));
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_comes_from_the_first_folder_or_the_file_name() {
        let t = |k| table_for_key(k, "s3_sql_loader_files");
        assert_eq!(t("orders/2026/11/a.csv").unwrap(), "orders");
        assert_eq!(t("Orders/a.csv").unwrap(), "orders");
        assert_eq!(t("customers.2026-11-01.csv.gz").unwrap(), "customers");
        assert_eq!(t("bad name/a.csv").unwrap_err().kind, FileErrorKind::UnsafeName);
        assert_eq!(t("x;drop/a.csv").unwrap_err().kind, FileErrorKind::UnsafeName);
        assert_eq!(
            t("s3_sql_loader_files/a.csv").unwrap_err().kind,
            FileErrorKind::UnsafeName
        );
    }

    #[test]
    fn the_first_matching_route_wins_and_unmatched_keys_use_the_defaults() {
        let config = Config {
            routes: vec![
                RouteConfig {
                    glob: Some("events/**/*.jsonl.gz".into()),
                    table: Some("Events".into()),
                    ..Default::default()
                },
                RouteConfig {
                    prefix: Some("partner/".into()),
                    table: Some("partner_orders".into()),
                    format: Some(Format::Tsv),
                    write_mode: WriteMode::Upsert,
                    key_columns: vec!["Id".into()],
                    ..Default::default()
                },
            ],
            ..Config::default()
        };
        assert!(Routes::problems(&config.routes).is_empty());
        let routes = Routes::new(&config);
        let e = routes.resolve("events/2026/11/x.jsonl.gz");
        assert_eq!(e.table.unwrap(), "events");
        let p = routes.resolve("partner/a.tsv");
        assert_eq!(
            (p.table.unwrap(), p.format.delimiter, p.write_mode),
            ("partner_orders".into(), b'\t', WriteMode::Upsert)
        );
        assert_eq!(p.key_columns, ["id"]);
        let d = routes.resolve("orders/a.csv");
        assert_eq!((d.table.unwrap(), d.write_mode), ("orders".into(), WriteMode::Append));
    }

    #[test]
    fn every_file_gets_the_configured_limits_whatever_its_route() {
        let mut config = Config {
            routes: vec![RouteConfig {
                prefix: Some("partner/".into()),
                format: Some(Format::Jsonl),
                ..Default::default()
            }],
            ..Config::default()
        };
        config.limits.record_bytes = 4096;
        config.limits.json_keys = 7;
        let routes = Routes::new(&config);
        for key in ["partner/a.jsonl", "orders/a.csv.gz"] {
            let limits = routes.resolve(key).format.limits;
            assert_eq!((limits.record_bytes, limits.json_keys), (4096, 7), "{key}");
        }
    }

    #[test]
    fn route_problems_are_reported_with_their_index() {
        let routes = vec![
            RouteConfig::default(),
            RouteConfig {
                prefix: Some("a/".into()),
                write_mode: WriteMode::Upsert,
                ..Default::default()
            },
            RouteConfig {
                glob: Some("a/[".into()),
                header: Some(false),
                ..Default::default()
            },
        ];
        let problems = Routes::problems(&routes);
        assert!(
            problems[0].starts_with("routes[0]: give exactly one of prefix or glob"),
            "{problems:?}"
        );
        assert!(problems[1].starts_with("routes[1].key_columns"), "{problems:?}");
        assert!(problems[2].starts_with("routes[2].glob"), "{problems:?}");
        assert!(problems[3].starts_with("routes[2].columns"), "{problems:?}");
    }
}
