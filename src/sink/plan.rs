//! What a load writes: the file's header as column names, the plan against the table (create
//! it, add columns, or refuse under the route's rules), and the checks and widening of values.

use crate::error::{FileError, FileErrorKind, LoadError};
use crate::format::Batch;
use crate::routes::{LoadSpec, METADATA_COLUMNS, MissingColumns, NewColumns};
use crate::schema::{self, ColumnCheck, ColumnType, MAX_COLUMNS, TypeInference};

/// The file's header as column names: each must be a safe identifier, once.
pub fn file_columns(header: &[String]) -> Result<Vec<String>, FileError> {
    if header.len() > MAX_COLUMNS {
        return Err(FileError::new(
            FileErrorKind::Schema,
            format!(
                "the header has {} columns; at most {MAX_COLUMNS} are supported",
                header.len()
            ),
        )
        .at_line(Some(1)));
    }
    let mut columns: Vec<String> = Vec::with_capacity(header.len());
    for (i, raw) in header.iter().enumerate() {
        let name = raw.trim();
        if !schema::is_safe_identifier(name) {
            return Err(FileError::new(
                FileErrorKind::UnsafeName,
                format!(
                    "header column {} {name:?} is not a safe SQL identifier (letters, digits and _, not starting with a digit, at most 63 characters)",
                    i + 1
                ),
            )
            .at_line(Some(1)));
        }
        let name = schema::normalize(name);
        if columns.contains(&name) {
            return Err(FileError::new(
                FileErrorKind::Schema,
                format!("column {name:?} appears twice in the header"),
            )
            .at_line(Some(1))
            .in_column(name));
        }
        columns.push(name);
    }
    Ok(columns)
}

/// What a load writes and what it must change first.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// `Some(types)`: create the table with `columns` of these types.
    pub create: Option<Vec<ColumnType>>,
    /// Columns to add to the existing table first (`on_new_columns = "add"`).
    pub add: Vec<(String, ColumnType)>,
    /// The columns written, in order: the file's, then the lineage columns if asked for.
    pub columns: Vec<String>,
    /// Their types in the table.
    pub types: Vec<ColumnType>,
}

impl Plan {
    /// What each planned column must satisfy: its type, and the limits an existing column's
    /// declaration adds (`limits`, by column name).
    pub fn checks(&self, limits: &std::collections::HashMap<String, schema::Limits>) -> Vec<ColumnCheck> {
        self.columns
            .iter()
            .zip(&self.types)
            .map(|(c, t)| ColumnCheck {
                ty: *t,
                limits: limits.get(c).copied().unwrap_or_default(),
            })
            .collect()
    }
}

/// Matches the file's columns (`fixed`: types the format fixes, see `Decoded::types`) against the table
/// (`existing`: name and type of each column, or `None` when it does not exist) under the
/// route's rules, inferring types from `sample` for a new table or new columns.
pub fn plan_load(
    table: &str,
    file: &[String],
    fixed: &[Option<ColumnType>],
    existing: Option<Vec<(String, ColumnType)>>,
    spec: &LoadSpec,
    sample: Option<&Batch>,
) -> Result<Plan, FileError> {
    let schema_error = |message: String, column: Option<&str>| {
        let e = FileError::new(FileErrorKind::Schema, message).at_line(Some(1));
        match column {
            Some(c) => e.in_column(c),
            None => e,
        }
    };
    let mut columns = file.to_vec();
    // Types for new columns: declared by the route, else nested JSON, else inferred from the
    // sample (only types that keep every value as written), else text.
    let mut inferred = {
        let mut inference = TypeInference::new(file.len());
        if let Some(batch) = sample.filter(|_| spec.infer_types) {
            for r in 0..batch.len().min(schema::INFERENCE_SAMPLE_ROWS) {
                for (i, value) in batch.row(r).enumerate() {
                    inference.observe(i, value);
                }
            }
        }
        let types = inference.finish();
        types
            .into_iter()
            .zip(file)
            .enumerate()
            .map(
                |(i, (t, name))| match spec.widened.get(name).or(spec.column_types.get(name)) {
                    Some(declared) => *declared,
                    None => fixed.get(i).copied().flatten().unwrap_or(t),
                },
            )
            .collect::<Vec<_>>()
    };
    if spec.metadata_columns {
        if let Some(c) = file.iter().find(|c| METADATA_COLUMNS.contains(&c.as_str())) {
            return Err(schema_error(
                format!("column {c:?} is reserved for the lineage columns"),
                Some(c),
            ));
        }
        columns.extend(METADATA_COLUMNS.iter().map(|c| c.to_string()));
        inferred.extend([
            ColumnType::Text,
            ColumnType::Text,
            ColumnType::TimestampTz,
            ColumnType::Integer,
        ]);
    }
    if let Some(k) = spec.key_columns.iter().find(|k| !file.contains(k)) {
        return Err(schema_error(format!("key column {k:?} is not in the file"), Some(k)));
    }
    let Some(existing) = existing else {
        if !spec.create_tables {
            return Err(FileError::new(
                FileErrorKind::Schema,
                format!("table {table:?} does not exist and creating tables is off"),
            ));
        }
        return Ok(Plan {
            create: Some(inferred.clone()),
            add: Vec::new(),
            columns,
            types: inferred,
        });
    };
    let mut types = Vec::with_capacity(columns.len());
    let mut add = Vec::new();
    let mut new = Vec::new();
    for (c, t) in columns.iter().zip(&inferred) {
        match existing.iter().find(|(name, _)| name == c) {
            Some((_, existing_type)) => types.push(*existing_type),
            None if spec.on_new_columns == NewColumns::Add => {
                add.push((c.clone(), *t));
                types.push(*t);
            }
            None => new.push(c.as_str()),
        }
    }
    if !new.is_empty() {
        return Err(schema_error(
            format!(
                "column(s) {} of the file are not in table {table:?} (on_new_columns = \"fail\")",
                new.join(", ")
            ),
            Some(new[0]),
        ));
    }
    if spec.on_missing_columns == MissingColumns::Fail {
        let missing: Vec<&str> = existing
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| !columns.iter().any(|c| c == n))
            .collect();
        if !missing.is_empty() {
            return Err(schema_error(
                format!(
                    "column(s) {} of table {table:?} are not in the file (on_missing_columns = \"fail\")",
                    missing.join(", ")
                ),
                Some(missing[0]),
            ));
        }
    }
    Ok(Plan {
        create: None,
        add,
        columns,
        types,
    })
}

impl Plan {
    /// The columns this load creates or adds, with their types: the ones it may widen.
    pub fn new_columns(&self) -> Vec<(String, ColumnType)> {
        match &self.create {
            Some(types) => self.columns.iter().cloned().zip(types.iter().copied()).collect(),
            None => self.add.clone(),
        }
    }
}

/// Checks every value of the file's typed columns (`types` in the order of the batch's
/// columns; any after the batch's own, such as lineage columns, are not the file's) with the one rule of [`ColumnType::accepts`], so that a database's own, looser
/// parsing (PostgreSQL reads `007` as the integer 7) never changes a value.
pub(crate) fn check_values(batch: &Batch, columns: &[String], checks: &[ColumnCheck]) -> Result<(), FileError> {
    for (c, (column, check)) in columns.iter().zip(checks).enumerate().take(batch.width()) {
        if check.is_trivial() {
            continue;
        }
        for r in 0..batch.len() {
            if let Some(value) = batch.get(r, c)
                && let Err(message) = check.check(value)
            {
                return Err(batch.error_at(r, column, FileErrorKind::Type, message));
            }
        }
    }
    Ok(())
}

/// After a failed attempt: when a value did not fit a column that this load created or added
/// (`new_columns`), the spec to try again with that column widened (integer to decimal,
/// anything to text). The whole attempt, DDL included, was rolled back, so the file still
/// loads whole, into the types that fit all of it.
pub(crate) fn widened_spec(
    error: &LoadError,
    new_columns: &[(String, ColumnType)],
    spec: &LoadSpec,
) -> Option<LoadSpec> {
    let LoadError::Permanent(e) = error else { return None };
    if e.kind != FileErrorKind::Type {
        return None;
    }
    let column = e.column.as_deref()?;
    if spec.column_types.contains_key(column) {
        return None; // a declared type is kept: the file fails
    }
    let (_, current) = new_columns.iter().find(|(c, _)| c == column)?;
    let wider = current.widened()?;
    tracing::info!(db.column = %column, from = ?current, to = ?wider, "a value does not fit the inferred type: widening the new column");
    let mut spec = spec.clone();
    spec.widened.insert(column.to_string(), wider);
    Some(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_must_be_safe_and_unique() {
        let h = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(file_columns(&h(&["Id", " qty "])).unwrap(), ["id", "qty"]);
        let e = file_columns(&h(&["id", "drop table x;"])).unwrap_err();
        assert_eq!(e.kind, FileErrorKind::UnsafeName);
        assert!(e.message.contains("header column 2"), "{}", e.message);
        assert_eq!(file_columns(&h(&["a", "A"])).unwrap_err().kind, FileErrorKind::Schema);
    }

    fn spec(f: impl FnOnce(&mut LoadSpec)) -> LoadSpec {
        let mut spec = crate::routes::Routes::new(&crate::config::Config::default()).resolve("t/a.csv");
        f(&mut spec);
        spec
    }

    #[test]
    fn the_plan_follows_the_routes_schema_rules() {
        let cols = vec!["id".to_string(), "extra".to_string()];
        let existing = || {
            Some(vec![
                ("id".to_string(), ColumnType::Integer),
                ("old".to_string(), ColumnType::Text),
            ])
        };
        let sample = Batch::from_rows(2, &[&[Some("1"), Some("2.5")]]);
        let e = plan_load("t", &cols, &[], existing(), &spec(|_| {}), None).unwrap_err();
        assert_eq!((e.kind, e.column.as_deref()), (FileErrorKind::Schema, Some("extra")));
        let add = plan_load(
            "t",
            &cols,
            &[],
            existing(),
            &spec(|s| s.on_new_columns = NewColumns::Add),
            Some(&sample),
        )
        .unwrap();
        assert_eq!(add.add, [("extra".to_string(), ColumnType::Numeric)]);
        let e = plan_load(
            "t",
            &cols[..1],
            &[],
            existing(),
            &spec(|s| s.on_missing_columns = MissingColumns::Fail),
            None,
        )
        .unwrap_err();
        assert_eq!(e.column.as_deref(), Some("old"));
        let e = plan_load("t", &cols, &[], None, &spec(|s| s.create_tables = false), None).unwrap_err();
        assert!(e.message.contains("does not exist"));
        let lineage = plan_load(
            "t",
            &cols,
            &[Some(ColumnType::Json), None],
            None,
            &spec(|s| s.metadata_columns = true),
            Some(&sample),
        )
        .unwrap();
        assert_eq!(
            lineage.columns,
            ["id", "extra", "_source_key", "_etag", "_loaded_at", "_line"]
        );
        assert_eq!(lineage.types[0], ColumnType::Json);
        let e = plan_load(
            "t",
            &cols,
            &[],
            None,
            &spec(|s| s.key_columns = vec!["nope".into()]),
            None,
        )
        .unwrap_err();
        assert_eq!(e.column.as_deref(), Some("nope"));
    }
}
