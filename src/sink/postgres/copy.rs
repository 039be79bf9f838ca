//! Rows into PostgreSQL with `COPY ... FROM STDIN (FORMAT csv)`: the file's own bytes when
//! they can pass through (see [`crate::format::raw`]), else the parser's rows re-encoded;
//! upserts go through a staging table.

use sqlx::postgres::PgDatabaseError;
use sqlx::{AssertSqlSafe, PgConnection};

use super::PgSink;
use crate::error::{LoadError, Stage};
use crate::format::{Batch, RawChunk, passthrough_possible};
use crate::reader::FileReader;
use crate::routes::{LoadSpec, WriteMode};
use crate::schema::ColumnType;
use crate::sink::insert::column_list;
use crate::sink::{FileRef, Lineage, Opened, check_values, db_error, file_columns, open_rows, quote_ident};

impl PgSink {
    /// Checks, creates or widens the table and streams the file into it with COPY (through a
    /// staging table for upserts). Returns the row count. CSV goes through as raw bytes when
    /// it can (see [`crate::format::raw`]), else through the parser.
    pub(super) async fn copy_rows(
        &self,
        conn: &mut PgConnection,
        file: FileRef<'_>,
        spec: &LoadSpec,
        reader: &FileReader<'_>,
        new_columns: &mut Vec<(String, ColumnType)>,
    ) -> Result<u64, LoadError> {
        let table = spec.table.clone()?;
        let passthrough = self.passthrough && passthrough_possible(file.key, &spec.format) && !spec.metadata_columns;
        if passthrough && let Some(rows) = self.copy_raw(conn, &table, spec, reader, new_columns).await? {
            return Ok(rows);
        }
        let Some(Opened {
            mut decoded,
            columns: file_cols,
            first,
        }) = open_rows(reader).await?
        else {
            return Ok(0);
        };
        let Some((plan, checks)) = self
            .plan(conn, &table, &file_cols, &decoded.types, spec, first.as_ref())
            .await?
        else {
            return Ok(0); // header only: no rows, and no sample to create the table from
        };
        *new_columns = plan.new_columns();
        self.prepare_table(conn, &table, &plan, spec).await?;
        let into = self.copy_target(conn, &table, spec).await?;
        let column_list = column_list(&plan.columns);
        let lineage = spec.metadata_columns.then(|| Lineage::new(&file));
        let statement = format!("COPY {into} ({column_list}) FROM STDIN WITH (FORMAT csv)");
        let mut copy = conn
            .copy_in_raw(&statement)
            .await
            .map_err(|e| copy_error(e, &plan.columns, 0))?;
        let mut buffer = Vec::with_capacity(1 << 20);
        let mut batch = first;
        let sent: Result<(), LoadError> = async {
            while let Some(b) = batch {
                check_values(&b, &plan.columns, &checks)?;
                buffer.clear();
                encode_csv(&b, lineage.as_ref(), &mut buffer);
                copy.send(buffer.as_slice())
                    .await
                    .map_err(|e| copy_error(e, &plan.columns, 0))?;
                batch = decoded.next_batch().await?;
            }
            Ok(())
        }
        .await;
        let rows = match sent {
            Ok(()) => copy.finish().await.map_err(|e| copy_error(e, &plan.columns, 0))?,
            Err(e) => {
                // Abort ends COPY with an error: the server discards what it received.
                let _ = copy.abort(e.to_string()).await;
                return Err(e);
            }
        };
        self.merge_stage(conn, &table, &plan.columns, spec).await?;
        Ok(rows)
    }

    /// The passthrough: `Ok(None)` when the file must go through the parser after all
    /// (whatever was sent, and any column added, is rolled back to the load's savepoint first).
    async fn copy_raw(
        &self,
        conn: &mut PgConnection,
        table: &str,
        spec: &LoadSpec,
        reader: &FileReader<'_>,
        new_columns: &mut Vec<(String, ColumnType)>,
    ) -> Result<Option<u64>, LoadError> {
        let db = |e| db_error(e, Stage::Database);
        let mut raw = match reader.raw().await {
            Ok(raw) => raw,
            Err(LoadError::Transient {
                stage: Stage::Decode, ..
            }) => return Ok(None), // unsuitable
            Err(e) => return Err(e),
        };
        if raw.header.is_empty() {
            return Ok(Some(0));
        }
        let file_cols = file_columns(&raw.header)?;
        let fixed = vec![None; file_cols.len()];
        let Some((plan, checks)) = self
            .plan(conn, table, &file_cols, &fixed, spec, raw.sample.as_ref())
            .await?
        else {
            return Ok(Some(0)); // header only
        };
        *new_columns = plan.new_columns();
        self.prepare_table(conn, table, &plan, spec).await?;
        raw.check_types(
            checks
                .iter()
                .take(file_cols.len())
                .map(|c| (!c.is_trivial()).then_some(*c))
                .collect(),
        );
        let into = self.copy_target(conn, table, spec).await?;
        let f = &spec.format;
        let statement = format!(
            "COPY {into} ({}) FROM STDIN WITH (FORMAT csv, HEADER {}, DELIMITER {}, QUOTE {}, NULL {})",
            plan.columns
                .iter()
                .map(|c| quote_ident(c))
                .collect::<Vec<_>>()
                .join(", "),
            raw.has_header,
            byte_literal(f.delimiter),
            byte_literal(f.quote),
            string_literal(&f.null),
        );
        let header_lines = u64::from(raw.has_header);
        let mut copy = conn
            .copy_in_raw(&statement)
            .await
            .map_err(|e| copy_error(e, &plan.columns, header_lines))?;
        let sent: Result<Option<u64>, LoadError> = async {
            loop {
                match raw.next().await {
                    Ok(RawChunk::Bytes(bytes, _)) => {
                        copy.send(bytes)
                            .await
                            .map_err(|e| copy_error(e, &plan.columns, header_lines))?;
                    }
                    Ok(RawChunk::End { records }) => return Ok(Some(records.saturating_sub(header_lines))),
                    Err(crate::format::DecodeFailure::Unsuitable(why)) => {
                        tracing::info!(reason = why, "passthrough refused; loading through the parser");
                        return Ok(None);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        .await;
        let expected = match sent {
            Ok(Some(expected)) => expected,
            other => {
                let _ = copy.abort("not loaded by passthrough").await;
                sqlx::query("ROLLBACK TO SAVEPOINT file_rows")
                    .execute(&mut *conn)
                    .await
                    .map_err(db)?;
                return other.map(|_| None);
            }
        };
        let rows = copy
            .finish()
            .await
            .map_err(|e| copy_error(e, &plan.columns, header_lines))?;
        if rows != expected {
            // COPY read the bytes differently from the loader's own count: trust neither.
            tracing::warn!(
                copied = rows,
                counted = expected,
                "passthrough count differs; loading through the parser"
            );
            sqlx::query("ROLLBACK TO SAVEPOINT file_rows")
                .execute(&mut *conn)
                .await
                .map_err(db)?;
            return Ok(None);
        }
        self.merge_stage(conn, table, &plan.columns, spec).await?;
        Ok(Some(rows))
    }

    /// Where COPY writes: the table, or for an upsert a staging table of the same shape.
    async fn copy_target(&self, conn: &mut PgConnection, table: &str, spec: &LoadSpec) -> Result<String, LoadError> {
        if spec.write_mode != WriteMode::Upsert {
            return Ok(quote_ident(table));
        }
        let db = |e| db_error(e, Stage::Database);
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TEMP TABLE {STAGE} (LIKE {} INCLUDING DEFAULTS) ON COMMIT DROP",
            quote_ident(table)
        )))
        .execute(&mut *conn)
        .await
        .map_err(db)?;
        sqlx::query(AssertSqlSafe(format!(
            "ALTER TABLE {STAGE} ADD COLUMN {STAGE_ORDER} bigserial"
        )))
        .execute(&mut *conn)
        .await
        .map_err(db)?;
        Ok(STAGE.to_string())
    }

    /// For an upsert, merges the staging table into the table: the file's last row per key wins.
    async fn merge_stage(
        &self,
        conn: &mut PgConnection,
        table: &str,
        columns: &[String],
        spec: &LoadSpec,
    ) -> Result<(), LoadError> {
        if spec.write_mode != WriteMode::Upsert {
            return Ok(());
        }
        let column_list = columns.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ");
        let keys = spec
            .key_columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        let updates: Vec<String> = columns
            .iter()
            .filter(|c| !spec.key_columns.contains(c))
            .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
            .collect();
        let action = if updates.is_empty() {
            "NOTHING".to_string()
        } else {
            format!("UPDATE SET {}", updates.join(", "))
        };
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} ({column_list}) SELECT DISTINCT ON ({keys}) {column_list} FROM {STAGE}
             ORDER BY {keys}, {STAGE_ORDER} DESC ON CONFLICT ({keys}) DO {action}",
            quote_ident(table)
        )))
        .execute(&mut *conn)
        .await
        .map_err(|e| db_error(e, Stage::Database))?;
        sqlx::query(AssertSqlSafe(format!("DROP TABLE {STAGE}")))
            .execute(&mut *conn)
            .await
            .map_err(|e| db_error(e, Stage::Database))?;
        Ok(())
    }
}

/// The staging table of an upsert, and its column keeping the file's row order.
const STAGE: &str = "\"_s3_sql_loader_stage\"";
const STAGE_ORDER: &str = "\"_s3_sql_loader_order\"";

/// Re-encodes rows as CSV for COPY: NULL as an empty unquoted field, every value quoted (so an
/// empty string stays an empty string and nothing in a value can end the data); with
/// `lineage`, the four lineage columns follow each row.
pub fn encode_csv(batch: &Batch, lineage: Option<&Lineage>, out: &mut Vec<u8>) {
    fn quoted(out: &mut Vec<u8>, bytes: &[u8]) {
        out.push(b'"');
        if bytes.contains(&b'"') {
            for &b in bytes {
                if b == b'"' {
                    out.push(b'"');
                }
                out.push(b);
            }
        } else {
            out.extend_from_slice(bytes);
        }
        out.push(b'"');
    }
    for r in 0..batch.len() {
        for (i, field) in batch.row(r).enumerate() {
            if i > 0 {
                out.push(b',');
            }
            if let Some(field) = field {
                quoted(out, field.as_bytes());
            }
        }
        if let Some(l) = lineage {
            for value in [&l.source_key, &l.etag, &l.loaded_at] {
                out.push(b',');
                quoted(out, value.as_bytes());
            }
            out.extend_from_slice(format!(",{}", batch.line(r)).as_bytes());
        }
        out.push(b'\n');
    }
}

/// A COPY error with the record and column from PostgreSQL's context when it gives them.
/// COPY's "line" counts records, including `header_lines` header lines.
pub fn copy_error(e: sqlx::Error, columns: &[String], header_lines: u64) -> LoadError {
    let context = e
        .as_database_error()
        .and_then(|d| d.try_downcast_ref::<PgDatabaseError>())
        .and_then(|pg| pg.r#where().map(str::to_string));
    match db_error(e, Stage::Database) {
        LoadError::Permanent(mut fe) => {
            if let Some(context) = context {
                fe.record = number_after(&context, "line ").map(|n| n.saturating_sub(header_lines));
                fe.column = text_after(&context, ", column ").filter(|c| columns.contains(c));
            }
            LoadError::Permanent(fe)
        }
        transient => transient,
    }
}

/// A one-byte COPY option as an escaped string literal.
fn byte_literal(b: u8) -> String {
    format!("E'\\x{b:02x}'")
}

/// Text as a standard SQL string literal.
fn string_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn number_after(text: &str, marker: &str) -> Option<u64> {
    let start = text.find(marker)? + marker.len();
    let digits: String = text[start..].chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

fn text_after(text: &str, marker: &str) -> Option<String> {
    let start = text.find(marker)? + marker.len();
    let rest = &text[start..];
    Some(rest[..rest.find(':').unwrap_or(rest.len())].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_encoding_quotes_values_and_leaves_nulls_empty() {
        let batch = Batch::from_rows(4, &[&[Some("1"), None, Some(""), Some("a \"b\",\nc")]]);
        let mut out = Vec::new();
        encode_csv(&batch, None, &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "\"1\",,\"\",\"a \"\"b\"\",\nc\"\n");
    }

    #[test]
    fn the_copy_context_gives_line_and_column() {
        let ctx = "COPY orders, line 3, column qty: \"abc\"";
        assert_eq!(number_after(ctx, "line "), Some(3));
        assert_eq!(text_after(ctx, ", column ").as_deref(), Some("qty"));
    }
}
