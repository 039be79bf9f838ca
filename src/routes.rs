//! Which table, format and load options each file gets. `[[routes]]` in the configuration map a
//! key prefix or a glob (relative to `incoming/`) to a table, a format with its options, a write
//! mode and schema rules; the first route that matches wins. A file no route matches loads into
//! the table named by its first folder, as CSV with the `[csv]` options.

use globset::{Glob, GlobMatcher};

use crate::config::Config;
use crate::error::{FileError, FileErrorKind};
use crate::format::{Format, FormatOptions};
use crate::schema;

pub use crate::config::routes::{MissingColumns, NewColumns, RouteConfig, Unmatched, WriteMode};

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
    unmatched: Unmatched,
}

fn one_byte(value: &Option<String>, default: u8) -> u8 {
    match value.as_deref().map(str::as_bytes) {
        Some([b]) => *b,
        _ => default,
    }
}

impl Routes {
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
            unmatched: config.routing.unmatched,
        }
    }

    /// The route `key` takes: its index in `[[routes]]`, or `None` for the default.
    pub fn route_of(&self, key: &str) -> Option<usize> {
        self.routes.iter().position(|r| match (&r.config.prefix, &r.glob) {
            (Some(p), _) => key.starts_with(p.as_str()),
            (None, Some(g)) => g.is_match(key),
            (None, None) => false,
        })
    }

    /// Whether `key` is to be left in `incoming/` (`routing.unmatched = "leave"` and no route).
    pub fn leaves(&self, key: &str) -> bool {
        self.unmatched == Unmatched::Leave && self.route_of(key).is_none()
    }

    /// How to load the file at `key` (relative to `incoming/`).
    pub fn resolve(&self, key: &str) -> LoadSpec {
        let route = self.route_of(key).map(|i| &self.routes[i]);
        let Some(Route { config: r, .. }) = route else {
            let table = match self.unmatched {
                Unmatched::Fail => Err(FileError::new(
                    FileErrorKind::Schema,
                    "no route matches this key, and routing.unmatched = \"fail\"",
                )),
                Unmatched::Default | Unmatched::Leave => table_for_key(key, &self.ledger_table),
            };
            return LoadSpec {
                table,
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
        assert!(crate::config::routes::problems(&config.routes).is_empty());
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
        let problems = crate::config::routes::problems(&routes);
        assert!(
            problems[0].starts_with("routes[0]: give exactly one of prefix or glob"),
            "{problems:?}"
        );
        assert!(problems[1].starts_with("routes[1].key_columns"), "{problems:?}");
        assert!(problems[2].starts_with("routes[2].glob"), "{problems:?}");
        assert!(problems[3].starts_with("routes[2].columns"), "{problems:?}");
    }
}
