//! `[[routes]]`: which table, format and load options each file gets, as written. The
//! matching itself is [`crate::routes`].

use globset::Glob;
use serde::Deserialize;

use crate::format::Format;
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

/// `[routing]`: what becomes of a file that no route matches.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    pub unmatched: Unmatched,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unmatched {
    /// Loads into the table named by the key's first folder (or its name up to the first dot).
    #[default]
    Default,
    /// Fails, with a report saying no route matches.
    Fail,
    /// Stays in `incoming/`, not loaded, with a warning on every tick.
    Leave,
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

/// Every problem of every route, for [`super::Config::validated`].
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
            let delimiter = r
                .delimiter
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
